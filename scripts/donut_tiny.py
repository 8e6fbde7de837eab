"""Donut's two stages end to end on synthetic documents, on CPU.

1. Render SynthDoG-style pages and CORD-like receipts (``datamodules.synthetic.documents``; skipped when present).
   Both stages use the pages' tokenizer (trained on their words, the menu names, digits and punctuation).
2. Reading pretraining (``configs/tiny/donut_read.yaml``): a narrow timm CNN with 2D sin-cos positions + a 2-layer
   MBart learn to write a page's text after ``<s_synthdog>``; ``export_dir`` receives its weights and added tokens
   (``weights.pt``: a timm CNN has no transformers layout).
3. Extraction finetuning (``configs/tiny/donut_cord.yaml``) from that file (``init_from``), the receipts' field
   tokens added by the datamodule, trained to emit the receipt JSON after ``<s_cord-v2>``.

Prints held-out TED accuracy, field F1 and normalised edit distance beside the trivial baseline (the training
set's most common JSON for every receipt) and writes ``OUT_DIR/results.json``.
Usage: ``python scripts/donut_tiny.py [--read-steps 1000] [--cord-steps 1000] …`` (``--help``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mmlm.app.recipes import recipe_main

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "configs" / "tiny"


def ensure_documents(out: Path, kind: str, train: int, val: int, seed: int) -> Path:
    """Write ``kind`` documents as shards under ``out`` unless its ``summary.json`` already matches."""
    from datamodules.synthetic.documents import write_documents

    summary = out / "summary.json"
    if summary.is_file():
        found = json.loads(summary.read_text())
        splits = found.get("splits", {})
        if (found.get("seed"), splits.get("train", {}).get("samples"), splits.get("validation", {}).get("samples")) \
                == (seed, train, val):
            return out
    write_documents(out, kind, train=train, val=val, seed=seed, layouts=("shards",), overwrite=True)
    return out


def stage_args(config: str, data: Path, run_dir: Path, steps: int, val_batches: int, batch_size: int,
               workers: int) -> list[str]:
    """Command-line overrides of one stage: data location, run directory, length and validation size."""
    return ["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", str(val_batches),
            "--trainer.log_every_n_steps", str(max(1, min(25, steps))),
            "--data.init_args.train_path", str(data / "shards" / "train"),
            "--data.init_args.val_path", str(data / "shards" / "validation"),
            "--data.init_args.batch_size", str(batch_size), "--data.init_args.num_workers", str(workers)]


def val_metrics(cli: Any) -> dict[str, float]:
    return {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def run_donut_tiny(data_dir: str | Path = "data/donut", out_dir: str | Path = "runs/donut_tiny",
                   train_docs: int = 4000, train_receipts: int = 4000, val_docs: int = 128, read_steps: int = 1000,
                   cord_steps: int = 1000, batch_size: int = 16, val_batches: int = 8, workers: int = 1,
                   threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Run data → reading pretraining → extraction finetuning; returns (and writes) the numbers of the table.

    ``threads``: torch intra-op threads of the training process (one, with one loader worker, uses two cores
    without oversubscribing a shared machine)."""
    import torch

    from datamodules.formats.donut_folder import read_ground_truths
    from mmlm.app.lightning import lightning_cli
    from mmlm.metrics.documents import most_common_json_baseline

    torch.set_num_threads(threads)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    docs = ensure_documents(data_dir / "docs", "docs", train_docs, val_docs, seed)
    receipts = ensure_documents(data_dir / "receipts", "receipts", train_receipts, val_docs, seed)
    export = out_dir / "read" / "export"
    tokenizer = ["--model.init_args.tokenizer", str(docs / "tokenizer")]
    start = time.time()
    read = lightning_cli([*stage_args("donut_read.yaml", docs, out_dir / "read", read_steps, val_batches, batch_size,
                                      workers), *tokenizer, "--model.init_args.export_dir", str(export)])
    weights = export / "weights.pt"
    middle = time.time()
    cord = lightning_cli([*stage_args("donut_cord.yaml", receipts, out_dir / "cord", cord_steps, val_batches,
                                      batch_size, workers), *tokenizer, "--model.init_args.init_from", str(weights)])
    evaluated = min(val_docs, val_batches * batch_size)
    baseline = most_common_json_baseline([p for parses in read_ground_truths(receipts / "shards" / "train")
                                          for p in parses[:1]],
                                         read_ground_truths(receipts / "shards" / "validation")[:evaluated])
    results = {"read": val_metrics(read), "cord": val_metrics(cord),
               "baseline": {k: baseline[k] for k in ("ted_accuracy", "f1", "ned")},
               "baseline_json": baseline["json"], "val_receipts": evaluated,
               "steps": {"read": read_steps, "cord": cord_steps}, "batch_size": batch_size,
               "train": {"docs": train_docs, "receipts": train_receipts},
               "seconds": {"read": middle - start, "cord": time.time() - middle}}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def print_results(results: dict[str, Any], seconds: float) -> None:
    """Held-out receipt extraction vs the most-common-JSON baseline, and the reading stage's scores."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Donut tiny: held-out synthetic receipts ({results['val_receipts']}), "
                        f"{seconds / 60:.1f} min in all")
    for col in ("metric", "Donut tiny", "baseline (most common training JSON)"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    cord, base = results["cord"], results["baseline"]
    table.add_row("TED accuracy", f"{100 * cord.get('ted_accuracy', float('nan')):.1f}%",
                  f"{100 * base['ted_accuracy']:.1f}%")
    table.add_row("field F1", f"{100 * cord.get('f1', float('nan')):.1f}%", f"{100 * base['f1']:.1f}%")
    table.add_row("normalised edit distance (lower is better)", f"{cord.get('ned', float('nan')):.3f}",
                  f"{base['ned']:.3f}")
    read = results["read"]
    table.add_row("reading stage: NED on held-out pages", f"{read.get('ned', float('nan')):.3f}", "-")
    Console(width=max(Console().width, 110)).print(table)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(run_donut_tiny, print_results, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
