"""VLMO's stages 2 and 3, retrieval and VQA fine-tuning end to end on the synthetic shapes data, on CPU.

1. Render the shapes data and the synthetic pairs (if missing). The pairs' word tokenizer covers every word of
   both, so all stages share it (``[MASK]`` is added by the model).
2. Stage 2 (``configs/tiny/vlmo_stage2.yaml``): text-only MLM on the captions, attention and V-FFN frozen.
3. Stage 3 (``configs/tiny/vlmo_stage3.yaml``) from the stage-2 checkpoint: ITC + ITM (hard negatives) + MLM;
   its final validation is dual-encoder retrieval over the held-out images (R@1/5/10 both ways).
4. Optional fine-tuning from the stage-3 checkpoint: VQA as answer classification (``vlmo_vqa.yaml``, official VQA
   accuracy vs the majority answer) and NLVR2-style pairs (``vlmo_nlvr2.yaml``, accuracy vs 50 %).

Prints every number beside its chance/majority baseline and writes ``OUT_DIR/results.json``.
Usage: ``python scripts/vlmo_tiny.py [--stage2-steps 150] [--stage3-steps 300] [--vqa-steps 200] …`` (``--help``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

from mmlm.app.quickstart import CONFIGS, ensure_data, train_val_answers  # noqa: E402
from mmlm.app.recipes import recipe_main  # noqa: E402


def stage_args(config: str, run_dir: Path, tokenizer: Path, steps: int, loader: tuple[int, int, int],
               data: dict[str, str], init_from: str | None = None) -> list[str]:
    """``mmlm fit`` arguments of one tiny stage: config, run directory, tokenizer, data locations, length and
    ``loader = (validation batches, workers, shuffle buffer)``."""
    val_batches, workers, shuffle_buffer = loader
    args = ["fit", "--config", str(CONFIGS / "tiny" / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", str(val_batches),
            "--model.init_args.tokenizer", str(tokenizer), "--data.init_args.num_workers", str(workers),
            "--data.init_args.shuffle_buffer", str(shuffle_buffer)]
    if init_from is not None:
        args += ["--model.init_args.init_from", init_from]
    return args + [item for key, value in data.items() for item in (f"--data.init_args.{key}", value)]


def captions(data_dir: Path) -> dict[str, str]:
    return {"train_urls": str(data_dir / "train" / "captions-*.tar"), "val_urls": str(data_dir / "val" / "captions-*.tar")}


def checkpoint(cli: Any) -> str:
    return cli.trainer.checkpoint_callback.best_model_path


def val_metrics(cli: Any) -> dict[str, float]:
    return {k[4:]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def retrieval_ceilings(data_dir: Path, images: int) -> dict[str, float]:
    """Best reachable R@1 with duplicate shapes captions (``scripts/blip2_tiny.py``'s, loaded from its file)."""
    spec = importlib.util.spec_from_file_location("blip2_tiny", Path(__file__).with_name("blip2_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.retrieval_ceilings(data_dir, images)


def ensure_pairs(pairs_dir: Path, train: int, val: int, seed: int) -> None:
    """Write the pairs (and the shared tokenizer) unless ``pairs_dir/summary.json`` already has these counts."""
    from datamodules.synthetic.pairs import write_pairs

    summary = pairs_dir / "summary.json"
    if summary.is_file():
        splits = json.loads(summary.read_text())["splits"]
        if (splits["train"]["pairs"], splits["val"]["pairs"]) == (train, val):
            return
    write_pairs(pairs_dir, train, val, seed, overwrite=True)


def write_answer_vocab(data_dir: Path, out: Path) -> Path:
    """The answer vocabulary of the training VQA shards as a JSON list."""
    from datamodules.tools.pairs import read_vqa_answers
    from mmlm.metrics.vqa import build_answer_vocab

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(build_answer_vocab(read_vqa_answers(str(data_dir / "train" / "vqa-*.tar")))))
    return out


def finetune(config: str, out_dir: Path, tokenizer: Path, steps: int, loader: tuple[int, int, int],
             data: dict[str, str], init_from: str, extra: list[str] = ()) -> dict[str, float]:
    """Fine-tune one task from ``init_from``; returns its final validation metrics."""
    from mmlm.app.lightning import lightning_cli

    run = out_dir / config.removeprefix("vlmo_").removesuffix(".yaml")
    args = stage_args(config, run, tokenizer, steps, loader, data, init_from)
    return val_metrics(lightning_cli([*args, *extra]))


def run_vlmo_tiny(data_dir: str | Path = "data/shapes", pairs_dir: str | Path = "data/shapes_pairs",
                  out_dir: str | Path = "runs/vlmo_tiny", train_images: int = 6000, val_images: int = 500,
                  train_pairs: int = 4000, val_pairs: int = 500, stage2_steps: int = 150, stage3_steps: int = 250,
                  vqa_steps: int = 150, nlvr2_steps: int = 0, val_batches: int = 8, workers: int = 1,
                  shuffle_buffer: int = 1000, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Run the stages; returns (and writes to ``out_dir/results.json``) the numbers of the table.

    ``threads`` sets torch's intra-op threads: tiny matrices gain nothing from more, and on a shared 2-core
    machine two threads made a stage-2 step 30× slower (0.3 s → 9 s) than one.
    """
    import torch

    torch.set_num_threads(threads)
    from mmlm.app.lightning import lightning_cli
    from mmlm.metrics import majority_answer_baseline

    data_dir, pairs_dir, out_dir = Path(data_dir), Path(pairs_dir), Path(out_dir)
    ensure_data(data_dir, train_images, val_images, seed)
    ensure_pairs(pairs_dir, train_pairs if nlvr2_steps else 0, val_pairs if nlvr2_steps else 0, seed)
    tokenizer, common = pairs_dir / "tokenizer", (val_batches, workers, shuffle_buffer)
    stage2 = lightning_cli(stage_args("vlmo_stage2.yaml", out_dir / "stage2", tokenizer, stage2_steps, common,
                                      captions(data_dir)))
    stage3 = lightning_cli(stage_args("vlmo_stage3.yaml", out_dir / "stage3", tokenizer, stage3_steps, common,
                                      {"train": json.dumps([{"urls": captions(data_dir)["train_urls"]}]),
                                       "val": json.dumps([{"urls": captions(data_dir)["val_urls"]}])},
                                      checkpoint(stage2)))
    images = min(val_images, val_batches * stage3.datamodule.batch_size)
    results: dict[str, Any] = {"stage2_mlm_loss": val_metrics(stage2).get("loss", float("nan")),
                               **{k: v for k, v in val_metrics(stage3).items()},
                               "chance_r1": 100.0 / images, "val_images_retrieval": images,
                               **retrieval_ceilings(data_dir, images),
                               "steps": {"stage2": stage2_steps, "stage3": stage3_steps, "vqa": vqa_steps,
                                         "nlvr2": nlvr2_steps}, "train_images": train_images}
    if vqa_steps:
        answers = write_answer_vocab(data_dir, out_dir / "answers.json")
        vqa = {"train_urls": str(data_dir / "train" / "vqa-*.tar"), "val_urls": str(data_dir / "val" / "vqa-*.tar")}
        results["vqa_acc"] = finetune("vlmo_vqa.yaml", out_dir, tokenizer, vqa_steps, common, vqa, checkpoint(stage3),
                                      ["--model.init_args.answers", str(answers)]).get("vqa_acc", float("nan"))
        results["majority_vqa_acc"] = majority_answer_baseline(*train_val_answers(data_dir))
    if nlvr2_steps:
        pairs = {"train_urls": str(pairs_dir / "train" / "pairs-*.tar"), "val_urls": str(pairs_dir / "val" / "pairs-*.tar")}
        results["nlvr2_acc"] = finetune("vlmo_nlvr2.yaml", out_dir, tokenizer, nlvr2_steps, common, pairs,
                                        checkpoint(stage3)).get("accuracy", float("nan"))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def print_results(results: dict[str, Any], seconds: float) -> None:
    """Retrieval R@1/5/10 both ways beside chance; VQA beside the majority answer; NLVR2 beside 50 %."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"VLMO tiny run: stages 2 → 3 → fine-tuning, held-out synthetic shapes ({seconds / 60:.1f} min)")
    for col in ("metric", "VLMO tiny", "baseline"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    chance, n = results["chance_r1"], results["val_images_retrieval"]
    for k in (1, 5, 10):
        for direction, name in (("i2t", "image→text"), ("t2i", "text→image")):
            table.add_row(f"retrieval R@{k} {name} (dual encoder)", f"{results[f'{direction}_r{k}']:.1f}%",
                          f"{min(100.0, k * chance):.1f}% (chance, {n} images)")
    table.add_row("  (best reachable R@1: duplicate captions tie)", "",
                  f"i2t {results['i2t_r1_ceiling']:.1f}%, t2i {results['t2i_r1_ceiling']:.1f}%")
    if "vqa_acc" in results:
        table.add_row("VQA accuracy (answer classification)", f"{100 * results['vqa_acc']:.1f}%",
                      f"{100 * results['majority_vqa_acc']:.1f}% (majority answer)")
    if "nlvr2_acc" in results:
        table.add_row("NLVR2-style pairs accuracy", f"{100 * results['nlvr2_acc']:.1f}%", "50.0% (balanced labels)")
    Console(width=max(Console().width, 110)).print(table)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(run_vlmo_tiny, print_results, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
