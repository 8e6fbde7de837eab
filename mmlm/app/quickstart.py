"""``mmlm quickstart``: the main job, end to end on CPU.

1. Render the synthetic shapes data set (if missing) with captions, VQA questions and a tokenizer.
2. Stage 1 (``configs/tiny/text_lm.yaml``): train a tiny GPT-2 on the data's text alone.
3. Stage 2 (``configs/tiny/frozen.yaml``): freeze it and train a small CNN + connector through it.
4. Evaluate on held-out images and print VQA accuracy and CIDEr beside the baselines.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning  # noqa: F401  (before rich, which datamodules.synthetic imports: see below)
import yaml

from datamodules.synthetic.shapes import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES

# Importing rich before Lightning makes jsonargparse read Lightning's ``int | float`` limits as floats, so
# ``--trainer.limit_val_batches 1`` would mean every batch (tests/test_cli.py::test_an_int_limit_stays_an_int…).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_DATA = Path("data/shapes")


def ensure_data(data_dir: Path, train: int, val: int, seed: int) -> dict[str, Any]:
    """Write the shapes data set unless ``data_dir/summary.json`` already matches the request."""
    from datamodules.synthetic.shapes import write_shapes

    summary_file = data_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("images") == {"train": train, "val": val} and summary.get("seed") == seed:
            return summary
    return write_shapes(data_dir, train=train, val=val, seed=seed, overwrite=True)  # only files it wrote before


def sources(config: str, split: str, data_dir: Path) -> str:
    """The config's ``data.init_args.<split>`` sources as JSON, re-rooted from ``data/shapes`` to ``data_dir``."""
    rows = yaml.safe_load((CONFIGS / "tiny" / config).read_text())["data"]["init_args"][split]
    for row in rows:
        row["urls"] = str(data_dir / Path(row["urls"]).relative_to(DEFAULT_DATA))
    return json.dumps(rows)


def stage_args(config: str, data_dir: Path, run_dir: Path, steps: int | None, val_batches: int | None,
               workers: int | None) -> list[str]:
    """Command-line overrides of one stage: run directory and data location, plus length, validation batches
    and loader workers where given (``None`` keeps the config's value)."""
    args = [
        "--config", str(CONFIGS / "tiny" / config),
        "--trainer.default_root_dir", str(run_dir),
        "--model.init_args.tokenizer", str(data_dir / "tokenizer"),
        "--data.init_args.train", sources(config, "train", data_dir),
        "--data.init_args.val", sources("frozen.yaml", "val", data_dir),
    ]
    optional = {"--trainer.max_steps": steps, "--trainer.val_check_interval": steps,
                "--trainer.limit_val_batches": val_batches, "--data.init_args.num_workers": workers}
    return args + [item for key, value in optional.items() if value is not None for item in (key, str(value))]


def run_quickstart(data_dir: str | Path = "data/shapes", out_dir: str | Path = "runs/quickstart",
                   train_images: int = DEFAULT_TRAIN_IMAGES, val_images: int = DEFAULT_VAL_IMAGES,
                   lm_steps: int | None = None, frozen_steps: int | None = None, val_batches: int | None = None,
                   workers: int | None = None, seed: int = 0) -> dict[str, float]:
    """Run the four steps; returns the numbers printed in the final table.

    ``lm_steps``, ``frozen_steps``, ``val_batches`` and ``workers`` override the tiny configs
    (``configs/tiny/text_lm.yaml``, ``frozen.yaml``); ``None`` keeps their values.
    """
    from mmlm.app.lightning import lightning_cli
    from mmlm.metrics import majority_answer_baseline

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    summary = ensure_data(data_dir, train_images, val_images, seed)
    lm_export = out_dir / "text_lm" / "export"
    lm = lightning_cli(["fit", *stage_args("text_lm.yaml", data_dir, out_dir / "text_lm", lm_steps, val_batches, workers),
                        "--model.init_args.export_dir", str(lm_export)])
    blind = {k: float(v) for k, v in lm.trainer.callback_metrics.items() if k.startswith("val/")}
    frozen = lightning_cli(["fit", *stage_args("frozen.yaml", data_dir, out_dir / "frozen", frozen_steps, val_batches,
                                               workers),
                            "--model.init_args.language_model.init_args.name_or_path", str(lm_export)])
    final = {k: float(v) for k, v in frozen.trainer.callback_metrics.items() if k.startswith("val/")}
    majority = majority_answer_baseline(*train_val_answers(data_dir))
    results = {"vqa_acc": final.get("val/vqa_acc", float("nan")), "cider": final.get("val/cider", float("nan")),
               "bleu4": final.get("val/bleu4", float("nan")), "blind_lm_vqa_acc": blind.get("val/vqa_acc", float("nan")),
               "blind_lm_cider": blind.get("val/cider", float("nan")), "majority_vqa_acc": majority,
               "train_images": summary.get("images", {}).get("train", train_images)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def train_val_answers(data_dir: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Human answers of the train and val VQA shards of a shapes data set (``data_dir/{train,val}/vqa-*.tar``)."""
    from datamodules.tools.pairs import read_vqa_answers

    return tuple(read_vqa_answers(str(Path(data_dir) / split / "vqa-*.tar")) for split in ("train", "val"))


def print_results(results: dict[str, float], seconds: float) -> None:
    """The side-by-side table of the main job."""
    from rich.console import Console
    from rich.table import Table

    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    table = Table(title=f"mmlm quickstart: held-out synthetic shapes ({took})")
    for col in ("model", "VQA accuracy", "CIDEr-D", "BLEU-4"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("majority answer", f"{100 * results['majority_vqa_acc']:.1f}%", "-", "-")
    table.add_row("frozen LM alone (blind)", f"{100 * results['blind_lm_vqa_acc']:.1f}%",
                  f"{results['blind_lm_cider']:.3f}", "-")
    table.add_row("Frozen (CNN → prefix → frozen LM)", f"{100 * results['vqa_acc']:.1f}%",
                  f"{results['cider']:.3f}", f"{results['bleu4']:.3f}")
    Console().print(table)


def quickstart_main(argv: Sequence[str]) -> int:
    """``mmlm quickstart [--data-dir DIR] [--out-dir DIR] [--train-images N] …`` (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="mmlm quickstart", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, param in inspect.signature(run_quickstart).parameters.items():
        kind = int if "int" in str(param.annotation) else str
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=param.default,
                            help="default: %(default)s" + (" (the config's value)" if param.default is None else ""))
    args = parser.parse_args(list(argv))
    start = time.time()
    results = run_quickstart(**vars(args))
    print_results(results, time.time() - start)
    from mmlm.app.report import build_report

    print(f"report (metrics, curves, examples): {build_report(Path(args.out_dir) / 'frozen')}")
    return 0
