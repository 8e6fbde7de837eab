"""Cached frozen-encoder features: BLIP-2 stage-2 training steps/s from images (live frozen encoder) vs from
``mmlm data cache-features`` shards (``cached_features: true``, the encoder skipped).

Model: blip2_step.py's sizes through mmlm's own ``Blip2`` (frozen 4-layer 64-wide ViT at 64 px, 2-layer
Q-Former with 8 queries, frozen 4-layer 128-wide OPT), random weights, seed 0. Features are written by the
production tool (``mmlm.app.features.cache_features``) from the shapes caption shards; both sides read their shards
through ``ImageTextDataModule`` (``num_workers=0``, same seed, so the same samples in the same order; the live
side uses the evaluation centre crop so both see the same inputs) and train under ``pl.Trainer.fit``. Before
timing, the first batch's loss must be the same on both sides. A step is timed from one batch start to the next
(loading, decoding or reading features, forward, backward, optimizer) after ``warmup`` untimed steps; the two
sides alternate and the medians of steps/s are reported. ``ratio`` = cached / live.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import Scale, alternate, captions_glob, median, row
from lightning_overhead import StepClock

from datamodules import ImageTextDataModule, Source
from mmlm.app.features import cache_features
from mmlm.encoders import HFVisionEncoder
from mmlm.language import HFCausalLM
from mmlm.models import Blip2

VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
          "image_size": 64, "patch_size": 8, "initializer_range": 0.02}
QFORMER = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "cross_attention_freq": 1}
OPT = {"model_type": "opt", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 512,
       "vocab_size": 128, "word_embed_proj_dim": 128, "max_position_embeddings": 128, "pad_token_id": 0,
       "bos_token_id": 1, "eos_token_id": 2}


QUERIES = 8  # the Q-Former's queries: the image span of each sentence


def build(tokenizer: str) -> Blip2:
    """The tiny BLIP-2 (random weights, seed 0; ViT and LM frozen)."""
    torch.manual_seed(0)
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=VISION, freeze=True)
    return Blip2(encoder, HFCausalLM(config=OPT), tokenizer=tokenizer, num_query_tokens=QUERIES, qformer=QFORMER,
                 lr=1e-4, warmup_steps=0)


def datamodule(urls: str, tokenizer: str, batch_size: int, steps: int, cached: bool) -> ImageTextDataModule:
    """Caption batches from ``urls``: images (centre crop) or cached features."""
    return ImageTextDataModule(train=[Source(urls, kind="caption")], tokenizer=tokenizer, image_size=VISION["image_size"],
                               batch_size=batch_size,
                               epoch_samples=steps * batch_size, resampled=True, shuffle_buffer=0,
                               train_crop_scale=1.0, cached_features=cached, caption_prompt="a picture of",
                               image_tokens=QUERIES)



def steps_per_second(model: Blip2, data: ImageTextDataModule, warmup: int, steps: int) -> float:
    """Median steps/s of ``warmup + steps`` training steps under ``pl.Trainer.fit`` (the first ``warmup`` untimed)."""
    clock = StepClock()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=warmup + steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(model, datamodule=data)
    gaps = [b - a for a, b in zip(clock.stamps[warmup:], clock.stamps[warmup + 1:])]
    return 1.0 / median(gaps)


def first_loss(model: Blip2, data: ImageTextDataModule) -> float:
    """Loss of the first training batch, eval mode, through the module's cached-feature hooks."""
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model.eval()
    model.on_validation_batch_start(batch, 0)
    with torch.no_grad():
        loss = float(model.training_loss(batch))
    model.on_validation_batch_end(None, batch, 0)
    return loss


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: training steps/s from cached features vs with the live frozen encoder."""
    tokenizer, steps = str(data / "tokenizer"), scale.warmup + scale.steps
    model = build(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        cache_features(model, captions_glob(data), tmp, batch_size=64)
        sides = {"cached": datamodule(str(Path(tmp) / "*.tar"), tokenizer, scale.batch_size, steps, cached=True),
                 "live": datamodule(captions_glob(data), tokenizer, scale.batch_size, steps, cached=False)}
        delta = abs(first_loss(model, sides["cached"]) - first_loss(model, sides["live"]))
        if delta > 1e-4:
            raise RuntimeError(f"cached and live losses differ by {delta:.2e}: not the same computation")
        rates = alternate({name: (lambda d=d: steps_per_second(model, d, scale.warmup, scale.steps))
                           for name, d in sides.items()}, scale.repeats)
    return [row(f"BLIP-2 stage-2 training from cached ViT features (batch {scale.batch_size})", rates["cached"],
                rates["live"], "steps/s", rates["cached"] / rates["live"], ">= 1.1")]
