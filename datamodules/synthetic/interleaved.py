"""Synthetic interleaved documents from the shapes images, where in-context examples genuinely help.

Each image shows 1–3 copies of one coloured shape (the shapes generator's scenes, recoloured to a
single kind). A *document* picks one attribute (colour, shape or count) and writes, for 3–5 images,
``<image> what is it? {value}.`` — the attribute is never named, so only earlier images of the
document tell which one is asked. Zero-shot, ``<image> what is it?`` is ambiguous (≈ 1/3 of the
answers can be right); with k demonstrations of the same attribute it is not.

Written next to the documents: image–caption pairs (``"two red circles."``) and text-only
documents (several captions), as KOSMOS-1 trains on all three, plus evaluation queries and a
support set (every support image asked all three ways) for k-shot VQA. Documents alternate between
the OBELICS layout (images inline in the tar) and the MMC4 layout (images base64 in the JSON).
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.synthetic.shapes import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    VAL_SHARDS,
    Scene,
    _jpeg,
    captions_for,
    coverage_texts,
    draw_scene,
    sample_scene,
)
from mmlm.tokenizers import train_word_tokenizer

ATTRIBUTES = ("colour", "shape", "count")
QUESTION = "what is it?"
#: The layout of one image's text in a document, and of a k-shot demonstration.
DEMO_TEMPLATE = "{prompt} {target}."
LAYOUTS = ("obelics", "mmc4", "mixed")


def single_kind_scene(rng: np.random.Generator) -> Scene:
    """A shapes scene whose 1–3 shapes all share one colour and one kind."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return tuple(replace(s, colour=colour, shape=shape) for s in sample_scene(rng))


def attribute(scene: Scene, name: str) -> str:
    """The scene's ``colour``, ``shape`` or ``count`` — a count as digits, as VQAv2's answers are written (the official
    scorer turns a predicted "two" into "2" but leaves ten agreeing human answers as they are)."""
    return {"colour": scene[0].colour, "shape": scene[0].shape, "count": str(len(scene))}[name]


def _image(rng: np.random.Generator) -> tuple[bytes, Scene]:
    scene = single_kind_scene(rng)
    return _jpeg(draw_scene(scene)), scene


def _rng(seed: int, part: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ["docs", "pairs", "text", "val", "support"].index(part), index])


def document(index: int, seed: int, layout: str) -> dict[str, bytes]:
    """One interleaved document sample (``json`` in the OBELICS or MMC4 layout + inline images)."""
    rng = _rng(seed, "docs", index)
    name = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    images = [_image(rng) for _ in range(int(rng.integers(3, 6)))]
    texts = [DEMO_TEMPLATE.format(prompt=QUESTION, target=attribute(scene, name)) for _, scene in images]
    if layout == "mixed":
        layout = LAYOUTS[index % 2]
    sample: dict[str, Any] = {"__key__": f"{index:09d}"}
    if layout == "obelics":
        doc = {"texts": [t for text in texts for t in (None, text)],
               "images": [r for i in range(len(images)) for r in (f"{i}.jpg", None)], "attribute": name}
        sample.update({f"{i}.jpg": jpg for i, (jpg, _) in enumerate(images)})
    else:
        info = [{"image_base64": base64.b64encode(jpg).decode(), "matched_text_index": i, "matched_sim": 0.3}
                for i, (jpg, _) in enumerate(images)]
        doc = {"text_list": texts, "image_info": info, "attribute": name}
    sample["json"] = json.dumps(doc, sort_keys=True).encode()
    return sample


def caption_pair(index: int, seed: int) -> dict[str, bytes]:
    """An image–caption sample (img2dataset layout)."""
    jpg, scene = _image(_rng(seed, "pairs", index))
    captions = captions_for(scene)
    meta = {"caption": captions[0], "captions": captions, "image_id": f"pair-{index}"}
    return {"__key__": f"{index:09d}", "jpg": jpg, "txt": captions[0].encode(), "json": json.dumps(meta).encode()}


def text_document(index: int, seed: int) -> dict[str, bytes]:
    """A text-only sample: 2–5 captions of random scenes."""
    rng = _rng(seed, "text", index)
    text = " ".join(captions_for(single_kind_scene(rng))[0] for _ in range(int(rng.integers(2, 6))))
    return {"__key__": f"{index:09d}", "txt": text.encode()}


def queries(index: int, seed: int, part: str) -> list[dict[str, bytes]]:
    """VQA samples of one image: one random attribute (``val``) or all three (``support``)."""
    rng = _rng(seed, part, index)
    jpg, scene = _image(rng)
    names = ATTRIBUTES if part == "support" else (ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))],)
    out = []
    for name in names:
        meta = {"question": QUESTION, "answers": [attribute(scene, name)] * 10, "question_type": name,
                "question_id": f"{part}-{index}-{name}", "image_id": f"{part}-{index}"}
        out.append({"__key__": f"{index:07d}{ATTRIBUTES.index(name)}", "jpg": jpg, "json": json.dumps(meta).encode()})
    return out


def _write(directory: Path, prefix: str, shard_size: int, samples) -> str | None:
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, shard_size, prefix)
    try:
        for sample in samples:
            writer.write(sample)
    finally:
        writer.close()
    return writer.url()


def write_interleaved(out: str | Path, docs: int, pairs: int, texts: int, val: int, support: int,
                      seed: int = 0, shard_size: int = 500, layout: str = "mixed",
                      overwrite: bool = False) -> dict[str, Any]:
    """Write the synthetic interleaved data set under ``out``; returns (and writes) ``summary.json``.

    Layout: ``train/docs-*.tar`` (interleaved documents), ``train/captions-*.tar``,
    ``train/text-*.tar``, ``val/vqa-*.tar`` (one query per image, spread over 8 shards),
    ``support/vqa-*.tar`` (each image asked all three ways), ``tokenizer/`` (word level). ``out`` must be empty
    unless ``overwrite`` (:func:`datamodules.formats.outputs.prepare_output`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"write_interleaved: layout {layout!r} is not one of {LAYOUTS}")
    out = prepare_output(out, overwrite)
    val_size = max(1, min(shard_size, -(-val // VAL_SHARDS)))
    urls = {
        "docs": _write(out / "train", "docs-", shard_size, (document(i, seed, layout) for i in range(docs))),
        "captions": _write(out / "train", "captions-", shard_size, (caption_pair(i, seed) for i in range(pairs))),
        "text": _write(out / "train", "text-", shard_size, (text_document(i, seed) for i in range(texts))),
        "val": _write(out / "val", "vqa-", val_size, (q for i in range(val) for q in queries(i, seed, "val"))),
        "support": _write(out / "support", "vqa-", shard_size,
                          (q for i in range(support) for q in queries(i, seed, "support"))),
    }
    words = [DEMO_TEMPLATE.format(prompt=QUESTION, target=w)
             for w in [*COLOURS, *SHAPES, *map(str, NUMBER_WORDS)]]
    tokenizer = train_word_tokenizer(words + coverage_texts(), out / "tokenizer")
    summary = {"seed": seed, "layout": layout, "urls": urls, "tokenizer": str(out / "tokenizer"),
               "vocab_size": len(tokenizer), "counts": {"docs": docs, "pairs": pairs, "texts": texts,
                                                        "val": val, "support": support},
               "vqa_prompt": "{}", "demo_template": DEMO_TEMPLATE}
    return write_summary(out, summary)
