"""Greedy generation throughput: ``Blip2.generate_text`` vs transformers' ``generate`` on the same model.

The pair of :mod:`blip2_step` (one random HF BLIP-2, loaded into mmlm with ``Blip2.from_hf``), eval mode,
the same VQA prompts (left-padded sentences that start with the image tokens, ``datamodules.pipeline.prefix_sentences``, read by both).
Both generate exactly ``new_tokens`` tokens per prompt (``min_new_tokens = max_new_tokens``, KV cache,
greedy). mmlm's time includes decoding ids to strings (what ``generate_text`` returns); tokens/s = B ×
new tokens / seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from blip2_step import build_pair, hf_inputs, sentences
from common import Scale, alternate, autocast, batches, row, timed

from mmlm.language import GenerationConfig


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: generated tokens/s, mmlm / transformers."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_pair(data, Path(tmp))
        batch = sentences(ours, batches(data, 1, scale.batch_size, 64, tokenizer=tmp)[0])
    ours.eval()
    hf.eval()
    n = scale.new_tokens
    ours.generation = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    inputs = hf_inputs(batch, prompt=True)
    settings = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "num_beams": 1,
                "pad_token_id": hf.config.text_config.pad_token_id}

    @torch.no_grad()
    def mine() -> float:
        with autocast():
            return len(batch) * n / timed(lambda: ours.generate_text(batch))

    @torch.no_grad()
    def theirs() -> float:
        with autocast():
            return len(batch) * n / timed(lambda: hf.generate(**inputs, **settings))

    mine(), theirs()  # warm-up
    speed = alternate({"mmlm": mine, "reference": theirs}, scale.repeats)
    return [row(f"BLIP-2 greedy generation ({len(batch)} prompts × {n} tokens)", speed["mmlm"], speed["reference"],
                "tokens/s", speed["mmlm"] / speed["reference"], ">= 1.0")]
