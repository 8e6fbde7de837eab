"""Cached frozen-encoder features: BLIP-2 stage-2 training steps/s from images (live frozen encoder) vs from
``mmlm data cache-features`` shards (``cached_features: true``, the encoder skipped).

Model: blip2_step.py's sizes through mmlm's own ``Blip2`` (frozen 4-layer 64-wide ViT at 64 px, 2-layer
Q-Former with 8 queries, frozen 4-layer 128-wide OPT), random weights, seed 0; and (``quick``/``full`` scales) the
real ratios of ``REAL``: a ViT-B/16 at 224 px, BLIP-2's 12-layer Q-Former with 32 queries and an OPT-125M-shaped LM,
batch 8, on the first caption shard. Features are written by the
production tool (``mmlm.app.features.cache_features``) from the shapes caption shards; both sides read their shards
through ``ImageTextDataModule`` (``num_workers=0``, same seed, so the same samples in the same order; the live
side uses the evaluation centre crop so both see the same inputs) and train under ``pl.Trainer.fit``. Before
timing, the first batch's loss must be the same on both sides. A step is timed from one batch start to the next
(loading, decoding or reading features, forward, backward, optimizer) after ``warmup`` untimed steps; the two
sides alternate and the medians of steps/s are reported. ``ratio`` = cached / live.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from common import Scale, alternate, captions_glob, device, median, row
from lightning_overhead import StepClock

from datamodules import ImageTextDataModule, Source
from mmlm.app.features import cache_features
from mmlm.encoders import HFVisionEncoder
from mmlm.language import HFCausalLM
from mmlm.models import Blip2


@dataclass(frozen=True)
class Shapes:
    """The frozen ViT, the Q-Former and the frozen OPT of one row (transformers config keys)."""

    name: str
    vision: dict[str, Any]
    qformer: dict[str, Any]
    lm: dict[str, Any]
    queries: int  # the Q-Former's queries: the image span of each sentence


OPT_IDS = {"model_type": "opt", "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
TINY = Shapes("tiny", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 8, "initializer_range": 0.02},
              {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "cross_attention_freq": 1},
              {**OPT_IDS, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "ffn_dim": 512,
               "word_embed_proj_dim": 128, "max_position_embeddings": 128}, 8)
#: Real ratios: a ViT-B/16 at 224 px (197 tokens), BLIP-2's Q-Former (12 layers, 768 wide, cross-attention every
#: second layer, 32 queries) and an OPT-125M-shaped LM (the shapes vocabulary: the head runs on target rows only).
REAL = Shapes("real", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "initializer_range": 0.02},
              {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
               "cross_attention_freq": 2},
              {**OPT_IDS, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072,
               "word_embed_proj_dim": 768, "max_position_embeddings": 2048}, 32)


def build(tokenizer: str, shapes: Shapes = TINY) -> Blip2:
    """The BLIP-2 of ``shapes`` (random weights, seed 0; ViT and LM frozen)."""
    torch.manual_seed(0)
    encoder = HFVisionEncoder(model_type="blip_2_vision_model", config=shapes.vision, freeze=True)
    return Blip2(encoder, HFCausalLM(config=shapes.lm), tokenizer=tokenizer, num_query_tokens=shapes.queries,
                 qformer=shapes.qformer, lr=1e-4, warmup_steps=0)


def datamodule(urls: str, tokenizer: str, batch_size: int, steps: int, cached: bool,
               shapes: Shapes = TINY) -> ImageTextDataModule:
    """Caption batches from ``urls``: images (centre crop) or cached features."""
    return ImageTextDataModule(train=[Source(urls, kind="caption")], tokenizer=tokenizer,
                               image_size=shapes.vision["image_size"], batch_size=batch_size,
                               epoch_samples=steps * batch_size, resampled=True, shuffle_buffer=0,
                               train_crop_scale=1.0, cached_features=cached, caption_prompt="a picture of",
                               image_tokens=shapes.queries)


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


def measure(shapes: Shapes, urls: str, tokenizer: str, batch_size: int, warmup: int, steps: int,
            repeats: int) -> dict[str, float]:
    """Steps/s ``{"cached", "live"}`` of the BLIP-2 of ``shapes``, the features cached from ``urls`` first."""
    model = build(tokenizer, shapes)
    with tempfile.TemporaryDirectory() as tmp:
        cache_features(model, urls, tmp, batch_size=64 if shapes is TINY else 16, device=device(), progress=False)
        sides = {"cached": datamodule(str(Path(tmp) / "*.tar"), tokenizer, batch_size, warmup + steps, True, shapes),
                 "live": datamodule(urls, tokenizer, batch_size, warmup + steps, False, shapes)}
        delta = abs(first_loss(model, sides["cached"]) - first_loss(model, sides["live"]))
        if delta > 1e-4:
            raise RuntimeError(f"cached and live losses differ by {delta:.2e}: not the same computation")
        return alternate({name: (lambda d=d: steps_per_second(model, d, warmup, steps)) for name, d in sides.items()},
                         repeats)


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """Training steps/s from cached features vs with the live frozen encoder: the tiny shapes, and (not at toy
    scale) the real ratios of :data:`REAL` at batch 8 on the first caption shard."""
    tokenizer = str(data / "tokenizer")
    rates = measure(TINY, captions_glob(data), tokenizer, scale.batch_size, scale.warmup, scale.steps, scale.repeats)
    rows = [row(f"BLIP-2 stage-2 training from cached ViT features (batch {scale.batch_size})", rates["cached"],
                rates["live"], "steps/s", rates["cached"] / rates["live"], ">= 1.1")]
    if scale.name != "toy":
        first = sorted(Path(data, "train").glob("captions-*.tar"))[0]
        rates = measure(REAL, str(first), tokenizer, 8, 1, 3, min(scale.repeats, 2))
        rows.append(row("BLIP-2 stage-2 training from cached ViT features, real ratios (ViT-B/16 at 224 px, "
                        "12-layer Q-Former with 32 queries, OPT-125M-shaped LM; batch 8)", rates["cached"],
                        rates["live"], "steps/s", rates["cached"] / rates["live"], ">= 3.0"))
    return rows
