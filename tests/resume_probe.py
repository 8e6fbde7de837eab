"""Test-only parts for ``tests/test_resume.py``'s ``kill -9`` run and ``scripts/fault_injection.py`` (class paths
``resume_probe.*``).

``KeyModel`` is the smallest :class:`~mmlm.models.base.MultimodalModule` (one linear layer on the
mean pixel); ``KeyRecorder`` appends ``global_step<TAB>keys`` after every training batch and can
send its own process a signal after a given step: SIGKILL (a hard kill: no cleanup, no checkpoint on
the way out) or SIGTERM / SIGUSR1 (a scheduler's preemption notice).
"""

from __future__ import annotations

import json
import os
import signal
import sys
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
    ``os.kill(signal.<kill_signal>)`` self after ``kill_after_step``."""

    def __init__(self, path: str, kill_after_step: int = -1, kill_signal: str = "SIGKILL") -> None:
        super().__init__()
        self.path, self.kill_after_step = Path(path), kill_after_step
        self.kill_signal = signal.Signals[kill_signal]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        path = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}")
        with path.open("a") as f:
            f.write(f"{trainer.global_step}\t{' '.join(batch.keys)}\n")
        if trainer.global_step == self.kill_after_step:
            os.kill(os.getpid(), self.kill_signal)


def fit_command(data: Path, root: Path, keys: Path, *, batch: int, samples: int, every: int, kill_after: int = -1,
                kill_signal: str = "SIGKILL", top_k: int = 1) -> list[str]:
    """``mmlm fit`` of :class:`KeyModel` for one epoch of ``samples`` on mixed caption + VQA shapes shards under
    ``data`` (``write_shapes``), 2 workers, a shuffle buffer, a checkpoint (``last.ckpt`` and the ``top_k`` best step
    files) every ``every`` steps in ``root/ckpt`` and :class:`KeyRecorder` (sending itself ``kill_signal`` after step
    ``kill_after``)."""
    train = [{"urls": f"{data}/train/vqa-*.tar", "kind": "vqa"},
             {"urls": f"{data}/train/captions-*.tar", "kind": "caption", "weight": 0.5}]
    checkpoint = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": every, "save_last": True,
                                "save_top_k": top_k}}
    recorder = {"class_path": "resume_probe.KeyRecorder",
                "init_args": {"path": str(keys), "kill_after_step": kill_after, "kill_signal": kill_signal}}
    return [sys.executable, "-m", "mmlm.app.cli", "fit", "--seed_everything=0", "--model=resume_probe.KeyModel",
            "--data=datamodules.ImageTextDataModule", f"--data.init_args.train={json.dumps(train)}",
            f"--data.init_args.tokenizer={data / 'tokenizer'}", "--data.init_args.image_size=8",
            f"--data.init_args.batch_size={batch}", f"--data.init_args.epoch_samples={samples}",
            "--data.init_args.num_workers=2", "--data.init_args.shuffle_buffer=8",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={json.dumps(checkpoint)}",
            f"--trainer.callbacks+={json.dumps(recorder)}"]


def recorded(path: Path) -> list[tuple[int, list[str]]]:
    """``(global_step after the batch, keys)`` per training batch :class:`KeyRecorder` wrote (none: no file)."""
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [(int(step), keys.split()) for step, keys in rows]


def uninterrupted_epoch(data: Path, batch: int, samples: int) -> list[list[str]]:
    """Keys per batch of epoch 0 with :func:`fit_command`'s data settings, straight from the datamodule."""
    from datamodules import ImageTextDataModule, Source

    train = [Source(f"{data}/train/vqa-*.tar", kind="vqa"), Source(f"{data}/train/captions-*.tar", weight=0.5)]
    dm = ImageTextDataModule(train=train, tokenizer=str(data / "tokenizer"), image_size=8, batch_size=batch,
                             epoch_samples=samples, num_workers=2, shuffle_buffer=8, seed=0)
    dm.setup("fit")
    return [b.keys for b in dm.train_dataloader()]
