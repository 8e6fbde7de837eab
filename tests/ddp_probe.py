"""A test-only callback that records what each DDP rank saw (used by ``tests/test_ddp.py``).

Loaded by class path (``ddp_probe.DDPProbe``) with ``tests/`` on ``PYTHONPATH``; every rank writes
``out_dir/rank{global_rank}.json`` with the ``(task, key)`` pairs of its training and validation
batches, its optimizer steps and the scalar metrics the trainer ended with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class DDPProbe(pl.Callback):
    """Record per rank: training samples, validation samples per pass and dataloader, steps, metrics.

    Args:
        out_dir: directory that receives one ``rank{r}.json`` per rank (written after every
            validation pass and at the end of training, so ``fit`` and ``validate`` both leave one).
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.train: list[list[str]] = []
        self.train_batches = 0
        self.val_passes: list[dict[str, list[list[str]]]] = []

    @staticmethod
    def _samples(batch: Any) -> list[list[str]]:
        """``[task, key]`` per example (keys repeat across the caption and VQA shard sets)."""
        return [[task, key] for task, key in zip(batch.tasks, batch.keys)]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.train += self._samples(batch)
        self.train_batches += 1

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_passes.append({})

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.val_passes[-1].setdefault(str(dataloader_idx), []).extend(self._samples(batch))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._dump(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer)

    def _dump(self, trainer: pl.Trainer) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "train_batches": self.train_batches, "train": self.train, "val": self.val_passes,
                  "metrics": metrics}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
