"""DINO on the synthetic shapes images, on CPU: k-NN and linear-probe accuracy of shape and colour before and after
training.

1. Render the shapes data (if missing).
2. Build ``configs/tiny/dino.yaml`` through the ``mmlm`` CLI and validate the randomly initialised ViT (the teacher is
   a copy of the student at step 0): weighted k-NN (k=20, T=0.07) and a linear probe of the class token, train images
   as the bank (the probe's training set), held-out
   images as queries, for the shape and the colour named in the caption (images whose caption names one shape / one
   colour only).
3. Train DINO for ``--steps`` steps and validate the teacher again; print both beside the majority-class baseline,
   and the teacher targets' entropies at the last step beside ``ln K`` (the collapse check), and write
   ``OUT_DIR/results.json``. The teacher's backbone is written before training
   (``OUT_DIR/random_backbone.safetensors``) and after (``OUT_DIR/backbone.safetensors``): ``scripts/blip2_tiny.py
   --vision-backbone FILE`` freezes either in BLIP-2.

Usage: ``python scripts/dino_tiny.py [--steps 1500] [--train 2000] [--val 300] [--out runs/tiny/dino_recipe]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

from mmlm.app.lightning import lightning_cli  # noqa: E402
from mmlm.app.quickstart import ensure_data  # noqa: E402


def evaluate(trainer, model, datamodule) -> dict[str, dict[str, float]]:
    """One validation pass: ``{"knn": val/knn_top1_*, "linear": val/linear_top1_*}`` by label set."""
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return {kind: {k.removeprefix(f"val/{kind}_top1_"): round(float(v), 4) for k, v in metrics.items()
                   if k.startswith(f"val/{kind}_top1_")} for kind in ("knn", "linear")}


def majority(datamodule) -> dict[str, float]:
    """Share of the most common label among labelled queries, per label set."""
    counts: dict[str, Counter] = {}
    for batch in datamodule.val_dataloader()[1]:
        for column, name in enumerate(batch.label_names):
            counts.setdefault(name, Counter()).update(int(x) for x in batch.labels[:, column] if x >= 0)
    return {name: round(c.most_common(1)[0][1] / sum(c.values()), 4) for name, c in counts.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--train", type=int, default=2000, help="training images rendered (also the k-NN bank)")
    parser.add_argument("--val", type=int, default=300, help="held-out query images")
    parser.add_argument("--data", type=Path, default=Path("data/dino_shapes"))
    parser.add_argument("--out", type=Path, default=Path("runs/tiny/dino_recipe"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    ensure_data(args.data, args.train, args.val, seed=0)
    shards = {"train_urls": args.data / "train" / "captions-*.tar", "bank_urls": args.data / "train" / "captions-*.tar",
              "val_urls": args.data / "val" / "captions-*.tar"}
    cli_args = ["--config", str(ROOT / "configs" / "tiny" / "dino.yaml"), "--trainer.default_root_dir", str(args.out),
                "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.steps),
                "--trainer.limit_val_batches", "1000", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_checkpointing", "false", "--data.init_args.num_workers", str(args.workers),
                "--model.init_args.backbone_file", str(args.out / "backbone.safetensors"),
                *[item for key, value in shards.items() for item in (f"--data.init_args.{key}", str(value))]]
    sys.argv = ["mmlm"]
    cli = lightning_cli(cli_args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    started = time.perf_counter()
    model.export_backbone(args.out / "random_backbone.safetensors")  # the same ViT untrained (blip2_tiny.py)
    before = evaluate(trainer, model, data)
    baseline = majority(data)
    trainer.fit(model, datamodule=data)
    entropies = {name: round(float(trainer.callback_metrics[f"train/{name}"]), 3)
                 for name in ("teacher_entropy", "teacher_mean_entropy")}
    after = evaluate(trainer, model, data)
    results = {"steps": args.steps, "seconds": round(time.perf_counter() - started), "random_init": before["knn"],
               "dino": after["knn"], "linear_random_init": before["linear"], "linear_dino": after["linear"],
               "majority": baseline, "last_step": entropies,
               "ln_K": round(math.log(model.loss.center.shape[-1]), 3)}
    print(f"teacher targets at the last step: entropy {entropies['teacher_entropy']:.2f} per image, "
          f"{entropies['teacher_mean_entropy']:.2f} of the batch mean (ln K = {results['ln_K']:.2f}: both there is "
          "the uniform collapse)")
    for kind, label in (("knn", "k-NN top-1"), ("linear", "linear probe top-1")):
        for name, value in after[kind].items():
            print(f"{label} {name:>6}: DINO {value:.3f} | same ViT at random init {before[kind].get(name, 0):.3f} | "
                  f"majority class {baseline.get(name, 0):.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
