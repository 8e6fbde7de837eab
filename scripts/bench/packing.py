"""Packed vs padded interleaved batches: training tokens/s of real (non-pad) tokens, same samples, same model.

A tiny KOSMOS-1 (resnet10t → resampler → Sub-LN decoder with xPos) trains on the synthetic interleaved
mixture (documents with 3–5 images, image–caption pairs, text). The *same* samples are collated twice:
padded (one sample per row, padded to the batch's longest) and packed (first-fit into rows of
``max_tokens``, attention blocked between samples). Both sides run ``warmup`` + ``steps`` optimizer steps
per round, alternating; the row reports real tokens per second (padding excluded) and the padding fraction
of each side.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import Scale, alternate, autocast, device, row, timed

from datamodules.interleaved import InterleavedDataModule, MixSource
from datamodules.pipeline.packing import collate_rows, pack_rows
from datamodules.synthetic.interleaved import write_interleaved
from mmlm.batch import SentenceBatch
from mmlm.connectors import Resampler
from mmlm.encoders import TimmEncoder
from mmlm.language import SubLNDecoder
from mmlm.models import Kosmos1

#: Model width, depth, latents and row length per scale (larger on CUDA).
SIZES = {"toy": (32, 2, 4, 96), "quick": (128, 4, 16, 256), "full": (256, 6, 32, 512)}


def build_model(tokenizer: str, scale: Scale) -> Kosmos1:
    width, depth, latents, _ = SIZES[scale.name]
    if torch.cuda.is_available() and scale.name != "toy":
        width, depth = width * 4, depth * 2
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t", img_size=32, model_kwargs={"channels": [16, 32, 64, 64], "stem_width": 16,
                                                                  "output_stride": 8})
    lm = SubLNDecoder(vocab_size=64, width=width, depth=depth, num_heads=max(2, width // 64), ffn_mult=4,
                      max_positions=1024, position="xpos")
    def connector(dv: int, d: int) -> Resampler:
        return Resampler(dv, d, num_latents=latents, depth=1, num_heads=2, head_dim=32)
    return Kosmos1(encoder=encoder, language_model=lm, tokenizer=tokenizer, connector=connector).to(device())


def draw_samples(synth: dict[str, Any], model: Kosmos1, count: int, max_tokens: int) -> list:
    """``count`` training samples of the mixture (documents, pairs, text in turn), built by the datamodule."""
    import webdataset as wds

    sources = [MixSource(synth["urls"][k], kind) for k, kind in
               (("docs", "interleaved"), ("captions", "caption"), ("text", "text"))]
    data = InterleavedDataModule(train=sources, max_tokens=max_tokens, max_images=8)
    data.resolved.marker, data.resolved.tokenizer = model.image_marker, model.tokenizer
    data.resolved.preprocess = model.image_preprocess
    build = data.example_fn("fit", sources)
    streams = [iter(wds.WebDataset(s.urls, shardshuffle=False, empty_check=False)) for s in sources]
    return [build(next(streams[i % 3]), i % 3) for i in range(count)]


def train_steps(model: Kosmos1, batches: list[SentenceBatch], optimizer: torch.optim.Optimizer) -> None:
    for batch in batches:
        with autocast():
            loss = model.training_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: real training tokens/s, packed / padded."""
    max_tokens, per_step = SIZES[scale.name][3], scale.batch_size
    steps = scale.warmup + scale.steps
    with tempfile.TemporaryDirectory() as tmp:
        synth = write_interleaved(tmp, docs=per_step * steps, pairs=per_step * steps, texts=per_step * steps,
                                  val=1, support=1, shard_size=max(16, per_step * steps))
        model = build_model(synth["tokenizer"], scale).train()
        samples = draw_samples(synth, model, per_step * steps, max_tokens)
    pad = model.tokenizer.pad_token_id
    chunks = [samples[i * per_step:(i + 1) * per_step] for i in range(steps)]
    padded = [collate_rows([[s] for s in chunk], pad).to(device()) for chunk in chunks]
    packed = [collate_rows(list(pack_rows(chunk, max_tokens, open_rows=len(chunk))), pad).to(device())
              for chunk in chunks]
    real = sum(int(b.attention_mask[:, :].sum()) for b in padded[scale.warmup:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def side(batches: list[SentenceBatch]):
        def measure() -> float:
            train_steps(model, batches[:scale.warmup], optimizer)
            return real / timed(lambda: train_steps(model, batches[scale.warmup:], optimizer))
        return measure

    speed = alternate({"packed": side(packed), "padded": side(padded)}, scale.repeats)
    pad_share = sum(b.padding_fraction() for b in padded) / len(padded)
    pack_share = sum(b.padding_fraction() for b in packed) / len(packed)
    name = (f"KOSMOS-1 training, packed vs padded interleaved batches ({per_step} samples/step; padding "
            f"{100 * pack_share:.0f}% vs {100 * pad_share:.0f}%)")
    return [row(name, speed["packed"], speed["padded"], "real tokens/s", speed["packed"] / speed["padded"], ">= 1.0")]
