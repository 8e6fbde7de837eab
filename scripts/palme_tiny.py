"""PaLM-E tiny on CPU: multimodal sentences vs a text-only baseline on the synthetic tabletop.

1. Render the tabletop data (if missing): block scenes, their state, VQA questions (one image, or
   before/after images) and manipulation plans (``mmlm data synth-tabletop``).
2. Train ``configs/tiny/palme.yaml`` once per variant, same LM, same sentences, same steps; only the
   spans differ: ``palme`` (images + state + objects), ``text_only`` (no spans), and with
   ``--variants`` also ``image_only`` and ``state_only`` (state + object tokens).
3. Held-out VQA accuracy (per question type too) and plan exact match / per-step accuracy per variant.

Prints the table and writes ``OUT_DIR/results.json``.
Usage: ``python scripts/palme_tiny.py [--train 8000] [--steps 2500] [--variants palme,text_only]`` (``--help``).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

from datamodules.tools.embodied import DEFAULT_TRAIN, DEFAULT_VAL  # noqa: E402
from mmlm.app.recipes import RecipeInputError, recipe_main  # noqa: E402

CONFIG = ROOT / "configs" / "tiny" / "palme.yaml"
VARIANTS = {"palme": ["image", "state", "object"], "text_only": [], "image_only": ["image"],
            "state_only": ["state", "object"]}


def ensure_data(data_dir: Path, train: int, val: int, seed: int) -> dict[str, Any]:
    """Write the tabletop data unless ``data_dir/summary.json`` already matches the request."""
    from datamodules.synthetic.tabletop import write_tabletop

    summary_file = data_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        counts = {split: block["samples"] for split, block in summary["splits"].items()}
        if counts == {"train": train, "val": val} and summary.get("seed") == seed:
            return summary
    return write_tabletop(data_dir, train=train, val=val, seed=seed, overwrite=True)


def variant_args(data_dir: Path, run_dir: Path, modalities: list[str], steps: int, val_batches: int,
                 workers: int, batch_size: int | None, max_new_tokens: int | None) -> list[str]:
    """``mmlm fit`` arguments of one variant: the tiny config re-rooted to ``data_dir`` and ``run_dir``
    (``None``: the config's batch size and generation length)."""
    optional = {"--data.init_args.batch_size": batch_size,
                "--model.init_args.generation.max_new_tokens": max_new_tokens}
    extra = [item for key, value in optional.items() if value is not None for item in (key, str(value))]
    return ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", str(val_batches),
            "--model.init_args.tokenizer", str(data_dir / "tokenizer"),
            "--model.init_args.predictions_dir", str(run_dir),
            "--data.init_args.train_urls", str(data_dir / "train" / "tabletop-*.tar"),
            "--data.init_args.val_urls", str(data_dir / "val" / "tabletop-*.tar"),
            "--data.init_args.modalities", json.dumps(modalities), "--data.init_args.num_workers", str(workers),
            *extra]


def per_type_accuracy(run_dir: Path, data_dir: Path) -> dict[str, float]:
    """Exact-answer accuracy per question type from the run's VQA predictions file."""
    import webdataset as wds

    truth = {}
    for sample in wds.WebDataset(sorted(str(p) for p in (data_dir / "val").glob("tabletop-*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        truth[meta["id"]] = (meta["question_type"], meta["target"])
    from mmlm.evaluation import result_file

    rows = json.loads(result_file(run_dir, "val", "vqa").read_text())
    hits: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        qtype, answer = truth[row["question_id"]]
        hits[qtype].append(row["answer"].strip().lower() == answer)
    return {qtype: sum(h) / len(h) for qtype, h in sorted(hits.items())}


def run_variant(name: str, data_dir: Path, out_dir: Path, steps: int, val_batches: int, workers: int,
                batch_size: int | None, max_new_tokens: int | None, threads: int) -> dict[str, Any]:
    """Train and validate one variant with ``threads`` torch threads; its validation metrics, per-type accuracy
    and wall time."""
    import torch

    from mmlm.app.lightning import lightning_cli

    torch.set_num_threads(threads)

    run_dir = out_dir / name
    start = time.time()
    cli = lightning_cli(variant_args(data_dir, run_dir, VARIANTS[name], steps, val_batches, workers, batch_size,
                                     max_new_tokens))
    metrics = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()
               if k.startswith("val/")}
    return metrics | {"per_type": per_type_accuracy(run_dir, data_dir), "seconds": time.time() - start}


def run_palme_tiny(data_dir: str | Path = "data/tabletop", out_dir: str | Path = "runs/palme_tiny",
                   train: int = DEFAULT_TRAIN, val: int = DEFAULT_VAL, steps: int = 2500, val_batches: int = 8,
                   variants: str = "palme,text_only", workers: int = 1, seed: int = 0, batch_size: int = 0,
                   max_new_tokens: int = 0, threads: int = 1, parallel: int = 2) -> dict[str, Any]:
    """Run the steps; returns (and writes to ``out_dir/results.json``) the numbers of the table.

    ``batch_size`` and ``max_new_tokens`` of 0 keep the config's values (the test shrinks them). ``parallel``
    variants train at once in forked processes with ``threads`` torch threads each (one thread per variant on
    two cores: more threads mostly wait for each other on a small model)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = set(variants.split(",")) - set(VARIANTS)
    if unknown:
        raise RecipeInputError(f"--variants: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    ensure_data(data_dir, train, val, seed)
    results: dict[str, Any] = {"steps": steps, "train": train, "val": val}
    args = (data_dir, out_dir, steps, val_batches, workers, batch_size or None, max_new_tokens or None, threads)
    if parallel <= 1:
        results |= {name: run_variant(name, *args) for name in variants.split(",")}
    else:
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {name: pool.submit(run_variant, name, *args) for name in variants.split(",")}
            results |= {name: future.result() for name, future in futures.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def print_results(results: dict[str, Any], seconds: float) -> None:
    """VQA accuracy and plan exact match / step accuracy per variant, side by side."""
    from rich.console import Console
    from rich.table import Table

    names = [n for n in VARIANTS if n in results]
    title = f"PaLM-E tiny: held-out synthetic tabletop ({seconds / 60:.1f} min wall, {results['steps']} steps each)"
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key, label in (("vqa_acc", "VQA accuracy"), ("plan_exact", "plan exact match"),
                       ("plan_step_acc", "plan step accuracy")):
        table.add_row(label, *(f"{100 * results[n].get(key, float('nan')):.1f}%" for n in names))
    for qtype in sorted({t for n in names for t in results[n]["per_type"]}):
        table.add_row(f"  VQA {qtype}", *(f"{100 * results[n]['per_type'].get(qtype, float('nan')):.1f}%"
                                          for n in names))
    table.add_row("train + eval time", *(f"{results[n]['seconds']:.0f} s" for n in names))
    Console(width=max(Console().width, 100)).print(table)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(run_palme_tiny, print_results, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
