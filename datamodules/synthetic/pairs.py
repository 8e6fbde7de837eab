"""NLVR2-style synthetic pairs: two shapes images + a statement about both → true/false.

Each sample is ``{"left.jpg", "right.jpg", "json": {"statement", "label", "id"}}``; statements compare the two
scenes ("the left image has more shapes than the right image.") or ask about one or both ("both images contain a
red shape."). Labels are balanced: a fair coin picks the label, then a statement with that truth value is drawn.
The tokenizer written next to the shards covers these statements *and* every word of the shapes data
(:func:`datamodules.synthetic.shapes.coverage_texts`), so one vocabulary serves captions, VQA and pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.synthetic.shapes import (
    COLOURS,
    SHAPES,
    SPLITS,
    Scene,
    _jpeg,
    _pick,
    coverage_texts,
    render_scene,
)
from mmlm.tokenizers import train_word_tokenizer

SIDES = ("left", "right")
MAX_DRAWS = 200


def _side(scenes: tuple[Scene, Scene], side: str) -> Scene:
    return scenes[SIDES.index(side)]


def _statement(rng: np.random.Generator, left: Scene, right: Scene) -> tuple[str, bool]:
    """One random statement about the pair and whether it holds."""
    scenes, kind = (left, right), int(rng.integers(6))
    side, colour, shape = _pick(rng, SIDES), _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)
    if kind == 0:
        return "the left image has more shapes than the right image.", len(left) > len(right)
    if kind == 1:
        return "the left image has fewer shapes than the right image.", len(left) < len(right)
    if kind == 2:
        return "both images have the same number of shapes.", len(left) == len(right)
    if kind == 3:
        return f"the {side} image contains a {colour} shape.", any(s.colour == colour for s in _side(scenes, side))
    if kind == 4:
        return f"the {side} image contains a {shape}.", any(s.shape == shape for s in _side(scenes, side))
    return (f"both images contain a {colour} shape.",
            all(any(s.colour == colour for s in scene) for scene in scenes))


def statement_with_label(rng: np.random.Generator, left: Scene, right: Scene, label: bool) -> str:
    """A random statement about ``(left, right)`` whose truth is ``label``.

    Raises:
        RuntimeError: no such statement was drawn in :data:`MAX_DRAWS` tries.
    """
    for _ in range(MAX_DRAWS):
        text, holds = _statement(rng, left, right)
        if holds == label:
            return text
    raise RuntimeError(f"no {label} statement found for scenes {left} / {right}")


def pair_statement_texts() -> list[str]:
    """Every statement the generator can write (for the tokenizer)."""
    words = " ".join([*COLOURS, *SHAPES, *SIDES])
    return ["the left image has more shapes than the right image.", "the left image has fewer shapes than the "
            "right image.", "both images have the same number of shapes.", f"the image contains a shape {words}.",
            "both images contain a shape."]


def _write_pair(idx: int, split: str, seed: int, writer: ShardWriter) -> bool:
    """Render pair ``idx`` of ``split`` and write it; returns its label."""
    rng = np.random.default_rng([seed, 100 + SPLITS.index(split), idx])
    (left_image, left), (right_image, right) = render_scene(rng), render_scene(rng)
    label = bool(rng.random() < 0.5)
    meta = {"statement": statement_with_label(rng, left, right, label), "label": label, "id": f"{split}-{idx:09d}"}
    writer.write({"__key__": f"{idx:09d}", "left.jpg": _jpeg(left_image), "right.jpg": _jpeg(right_image),
                  "json": json.dumps(meta, sort_keys=True).encode()})
    return label


def write_pairs(out: str | Path, train: int, val: int, seed: int = 0, shard_size: int = 1000,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``out/{train,val}/pairs-{i:05d}.tar``, ``out/tokenizer`` and ``out/summary.json``; returns the summary.

    Validation is spread over at least 8 shards (as the shapes data) so evaluation ranks each get one. ``out`` must
    be empty unless ``overwrite`` (:func:`datamodules.formats.outputs.prepare_output`).
    """
    if train < 0 or val < 0 or shard_size < 1:
        raise ValueError(f"write_pairs: need train, val >= 0 and shard_size >= 1, got {train}, {val}, {shard_size}")
    out, summary = prepare_output(out, overwrite), {"seed": seed, "splits": {}}
    for split, count in zip(SPLITS, (train, val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        size = shard_size if split == "train" else max(1, min(shard_size, -(-count // 8)))
        writer = ShardWriter(out / split, size, "pairs-")
        true = sum(_write_pair(i, split, seed, writer) for i in range(count))
        writer.close()
        summary["splits"][split] = {"pairs": count, "true": true, "shards": writer.shards, "urls": writer.url()}
    train_word_tokenizer(pair_statement_texts() + coverage_texts(), out / "tokenizer")
    summary["tokenizer"] = str(out / "tokenizer")
    return write_summary(out, summary)
