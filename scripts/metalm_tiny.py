"""MetaLM end to end on the synthetic shapes data, on CPU: semi-causal pretraining, then VQA finetuning.

1. Render the shapes data (if missing).
2. Semi-causal pretraining (``configs/tiny/metalm_pretrain.yaml``): image + a random caption prefix are encoded by
   the bidirectional encoders and docked into the Sub-LN decoder, which predicts the rest of the caption.
3. VQA finetuning (``configs/tiny/metalm_vqa.yaml``) from that checkpoint: image + "Question: … Answer:" go
   through the encoders, the decoder generates the answer.
4. Baseline (``configs/tiny/metalm_decoder_only.yaml``): the same decoder finetuned for the same steps on the same
   data without the docked encoders (question as causal text, no image).

Prints held-out VQA accuracy of MetaLM, of the decoder alone and of the majority answer; writes
``OUT_DIR/results.json``. Usage: ``python scripts/metalm_tiny.py [--finetune-steps 1200] …`` (``--help``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from mmlm.app.quickstart import CONFIGS, DEFAULT_DATA, ensure_data, train_val_answers  # noqa: E402
from mmlm.app.recipes import recipe_main  # noqa: E402


def stage_args(config: str, data_dir: Path, run_dir: Path, steps: int, val_batches: int, workers: int,
               batch_size: int | None) -> list[str]:
    """Overrides of one tiny config: run directory, data location (re-rooted from ``data/shapes``), length."""
    declared = yaml.safe_load((CONFIGS / "tiny" / config).read_text())["data"]["init_args"]
    args = ["--config", str(CONFIGS / "tiny" / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--model.init_args.tokenizer", str(data_dir / "tokenizer"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", str(val_batches), "--data.init_args.num_workers", str(workers)]
    for key in ("train_urls", "val_urls"):
        args += [f"--data.init_args.{key}", str(data_dir / Path(declared[key]).relative_to(DEFAULT_DATA))]
    return args + ([] if batch_size is None else ["--data.init_args.batch_size", str(batch_size)])


def val_metrics(cli: Any) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def pretrain(data_dir: Path, out_dir: Path, steps: int, workers: int, batch_size: int | None) -> tuple[str, float]:
    """Semi-causal pretraining; → (checkpoint of its weights for ``init_from``, validation loss)."""
    import torch

    from mmlm.app.lightning import lightning_cli

    cli = lightning_cli(["fit", *stage_args("metalm_pretrain.yaml", data_dir, out_dir / "pretrain", steps, 1,
                                            workers, batch_size)])
    path = out_dir / "pretrain" / "weights.ckpt"
    torch.save({"state_dict": cli.model.state_dict()}, path)
    return str(path), val_metrics(cli).get("val/loss", float("nan"))


def run_metalm_tiny(data_dir: str | Path = "data/shapes", out_dir: str | Path = "runs/metalm_tiny",
                    train_images: int = 6000, val_images: int = 500, pretrain_steps: int = 200,
                    finetune_steps: int = 1200, val_batches: int = 16, batch_size: int = 32, workers: int = 1,
                    threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Run the steps; returns (and writes to ``out_dir/results.json``) the numbers of the table.

    ``threads``: torch intra-op threads of the training process (1: the model on one core, the loader worker
    on the other; on a busy machine more threads mostly spin).
    """
    import torch

    from mmlm.app.lightning import lightning_cli
    from mmlm.metrics import majority_answer_baseline

    torch.set_num_threads(threads)

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ensure_data(data_dir, train_images, val_images, seed)
    results: dict[str, Any] = {"steps": {"pretrain": pretrain_steps, "finetune": finetune_steps},
                               "batch_size": batch_size, "train_images": train_images}
    init = []
    if pretrain_steps > 0:
        checkpoint, results["pretrain_val_loss"] = pretrain(data_dir, out_dir, pretrain_steps, workers, batch_size)
        init = ["--model.init_args.init_from", checkpoint]
    seconds = {}
    for name, config, extra in (("metalm", "metalm_vqa.yaml", init), ("decoder_only", "metalm_decoder_only.yaml", [])):
        start = time.time()
        cli = lightning_cli(["fit", *stage_args(config, data_dir, out_dir / name, finetune_steps, val_batches, workers,
                                                batch_size), *extra])
        seconds[name] = round(time.time() - start, 1)
        metrics = val_metrics(cli)
        results[f"{name}_vqa_acc"] = metrics.get("val/vqa_acc", float("nan"))
        results[f"{name}_val_loss"] = metrics.get("val/loss", float("nan"))
        results[f"{name}_per_type"] = {k.removeprefix("val/vqa_acc_qtype/"): v for k, v in sorted(metrics.items())
                                       if k.startswith("val/vqa_acc_qtype/")}  # the official per-type accuracy
    results["majority_vqa_acc"] = majority_answer_baseline(*train_val_answers(data_dir))
    results["val_questions"] = val_batches * batch_size
    results["finetune_seconds"] = seconds
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def print_results(results: dict[str, Any], seconds: float) -> None:
    """MetaLM vs the same decoder without docked encoders vs the majority answer."""
    from rich.console import Console
    from rich.table import Table

    steps = results["steps"]
    table = Table(title=f"MetaLM tiny: held-out VQA on synthetic shapes ({seconds / 60:.1f} min, "
                        f"{results['val_questions']} val questions)")
    for col in ("model", "VQA accuracy", "val loss"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(f"MetaLM (semi-causal pretraining {steps['pretrain']} steps + finetune {steps['finetune']})",
                  f"{100 * results['metalm_vqa_acc']:.1f}%", f"{results['metalm_val_loss']:.3f}")
    table.add_row(f"same decoder, no docked encoders (finetune {steps['finetune']})",
                  f"{100 * results['decoder_only_vqa_acc']:.1f}%", f"{results['decoder_only_val_loss']:.3f}")
    table.add_row("majority answer", f"{100 * results['majority_vqa_acc']:.1f}%", "-")
    kinds = Table(title="VQA accuracy per question type")
    for col in ("question type", "MetaLM", "decoder alone"):
        kinds.add_column(col, justify="left" if col == "question type" else "right")
    for kind, value in results["metalm_per_type"].items():
        kinds.add_row(kind, f"{100 * value:.1f}%", f"{100 * results['decoder_only_per_type'].get(kind, float('nan')):.1f}%")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(kinds)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(run_metalm_tiny, print_results, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
