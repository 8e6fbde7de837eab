"""Test-only parts for ``tests/test_resume.py``'s ``kill -9`` run (class paths ``resume_probe.*``).

``KeyModel`` is the smallest :class:`~mmlm.models.base.MultimodalModule` (one linear layer on the
mean pixel); ``KeyRecorder`` appends ``global_step<TAB>keys`` after every training batch and can
SIGKILL its own process after a given step (a hard kill: no cleanup, no checkpoint on the way out).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from mmlm.batch import Batch
from mmlm.models.base import MultimodalModule


class KeyModel(MultimodalModule):
    """``loss = mean(linear(mean pixel per channel)²)``; generates ``"red"`` for every example."""

    def __init__(self, lr: float = 0.01, warmup_steps: int = 1) -> None:
        super().__init__(lr=lr, warmup_steps=warmup_steps)
        self.head = nn.Linear(3, 1)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.head(batch.pixels.mean(dim=(2, 3))).pow(2).mean()

    def generate_text(self, batch: Batch) -> list[str]:
        return ["red"] * len(batch)


class KeyRecorder(pl.Callback):
    """Append each training batch's keys to ``path`` (``path`` with suffix ``.rank{r}`` under DDP);
    ``os.kill(SIGKILL)`` self after ``kill_after_step``."""

    def __init__(self, path: str, kill_after_step: int = -1) -> None:
        super().__init__()
        self.path, self.kill_after_step = Path(path), kill_after_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        path = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}")
        with path.open("a") as f:
            f.write(f"{trainer.global_step}\t{' '.join(batch.keys)}\n")
        if trainer.global_step == self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
