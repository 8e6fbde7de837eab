"""Lightning overhead: time per training step of ``Frozen`` under ``pl.Trainer.fit`` vs a hand-written loop.

Model: configs/tiny/frozen.yaml's sizes (narrow resnet10t at 64 px, 2-layer MLP connector), with the
4-layer, 128-wide GPT-2 of configs/tiny/text_lm.yaml built from a config dict (no stage-1 export). Both
sides start from copies of one model, use the same AdamW groups and warmup + cosine schedule, and step
through the same batches preloaded in memory. A step is timed from one batch start to the next
(everything the loop does per step: fetch, transfer, forward, backward, optimizer, scheduler, hooks,
``self.log``); the first ``warmup`` steps are not timed.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import Scale, alternate, autocast, batches, median, row, sync
from torch.utils.data import DataLoader

from mmlm.connectors import MLP
from mmlm.encoders import TimmEncoder
from mmlm.language import HFCausalLM
from mmlm.models import Frozen
from mmlm.models.base import param_groups, warmup_cosine

GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_positions": 128, "n_embd": 128, "n_layer": 4, "n_head": 4,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
RESNET = {"channels": [32, 64, 128, 128], "stem_width": 16, "output_stride": 16}
WARMUP_LR_STEPS = 100  # configs/tiny/frozen.yaml


def build_frozen(tokenizer: str) -> Frozen:
    """The tiny Frozen model (random weights, seed 0)."""
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=64, model_kwargs=RESNET)
    lm = HFCausalLM(config=GPT2)
    return Frozen(encoder=encoder, language_model=lm, tokenizer=tokenizer, connector=functools.partial(MLP, num_layers=2),
                  lr=0.002, warmup_steps=WARMUP_LR_STEPS, weight_decay=0.01)


def identity(item: Any) -> Any:
    """DataLoader ``collate_fn`` for already-collated batches."""
    return item


class StepClock(pl.Callback):
    """Records ``perf_counter`` at every training batch start (and once at the end of fit)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        sync()
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        sync()
        self.stamps.append(time.perf_counter())


def per_step(stamps: list[float], warmup: int) -> float:
    """Median seconds between consecutive stamps, skipping the first ``warmup`` intervals."""
    return median([b - a for a, b in zip(stamps, stamps[1:])][warmup:])


def lightning_step(model: Frozen, data: list[Any], warmup: int) -> float:
    """Seconds per step under ``Trainer.fit`` (no logger, checkpoint, progress bar or summary)."""
    clock = StepClock()
    cuda = torch.cuda.is_available()
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                         max_steps=len(data), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    trainer.fit(copy.deepcopy(model), train_dataloaders=DataLoader(data, batch_size=None, collate_fn=identity))
    return per_step(clock.stamps, warmup)


def hand_steps(model: Frozen, data: list[Any]) -> Iterator[None]:
    """The same training as a plain PyTorch loop: one ``next`` = one step."""
    model = copy.deepcopy(model).to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).train()
    optimizer = torch.optim.AdamW(param_groups(model, model.weight_decay), lr=model.lr, betas=model.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(model.warmup_steps, len(data), model.min_lr_ratio))
    for batch in data:
        if torch.cuda.is_available():
            batch = copy.copy(batch).to("cuda", non_blocking=True)
        with autocast():
            loss = model.training_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        yield


def hand_step(model: Frozen, data: list[Any], warmup: int) -> float:
    """Seconds per step of the hand-written loop, timed like :class:`StepClock`."""
    stamps = []
    steps = hand_steps(model, data)
    for _ in data:
        sync()
        stamps.append(time.perf_counter())
        next(steps)
    sync()
    stamps.append(time.perf_counter())
    return per_step(stamps, warmup)


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: seconds per step, Lightning / hand loop."""
    model = build_frozen(str(data / "tokenizer"))
    loaded = batches(data, scale.warmup + scale.steps, scale.batch_size, image_size=64,
                     image_tokens=model.image_marker.count)
    seconds = alternate({"mmlm": lambda: lightning_step(model, loaded, scale.warmup),
                         "reference": lambda: hand_step(model, loaded, scale.warmup)}, scale.repeats)
    return [row(f"Frozen train step, Lightning vs hand loop (batch {scale.batch_size})", seconds["mmlm"] * 1e3,
                seconds["reference"] * 1e3, "ms/step", seconds["mmlm"] / seconds["reference"], "<= 1.05")]
