"""A shard set with a known share of hostile samples, for reliability tests and demos.

``write_hostile(out)`` writes caption shards (``captions-*.tar``) and VQA shards (``vqa-*.tar``)
of tiny clean samples in which every ``period``-th sample (5 % by default) is hostile, cycling
through the kinds below, plus a word tokenizer (``out/tokenizer``). It returns the exact counts
a reader must report, so tests can compare them with the pipeline's:

=====================  =============================================  =========================
kind                   what is written                                counted as
=====================  =============================================  =========================
bad_image              random bytes as ``.jpg``                       ``bad_image`` (skipped)
empty_image            zero-byte ``.jpg``                             ``empty_image`` (skipped)
image_too_large        1-bit PNG of 2000×2000 (a few KB)              ``image_too_large``
grayscale              8-bit gray JPEG                                ``converted_grayscale``
cmyk                   CMYK JPEG                                      ``converted_cmyk``
rgba                   RGBA PNG with transparency                     ``converted_alpha``
gray16                 16-bit gray PNG                                ``converted_16bit``
missing_caption        no ``.txt``, JSON without ``caption``          ``missing_caption``
malformed_json         ``{"caption": "a re`` as ``.json``              ``bad_json``
non_utf8               Latin-1 bytes as ``.txt``                      ``bad_text``
missing_question       VQA JSON without ``question``                  ``missing_question``
truncated_tar          the shard is cut inside this sample's first    ``tar_error`` (once per
                       member (it is the shard's last sample)         shard; the sample is lost)
=====================  =============================================  =========================

``image_too_large`` needs the reader's pixel limit below 4 M pixels: the summary's
``max_image_pixels`` (1 M) is the value to configure.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from mmlm.tokenizers import train_word_tokenizer

CAPTION_KINDS = ("bad_image", "empty_image", "image_too_large", "grayscale", "cmyk", "rgba", "gray16",
                 "missing_caption", "malformed_json", "non_utf8")
VQA_KINDS = ("missing_question", "truncated_tar")
#: Reason each kind is counted under by the pipeline (see the module docstring).
COUNTED_AS = {"bad_image": "bad_image", "empty_image": "empty_image", "image_too_large": "image_too_large",
              "grayscale": "converted_grayscale", "cmyk": "converted_cmyk", "rgba": "converted_alpha",
              "gray16": "converted_16bit", "missing_caption": "missing_caption", "malformed_json": "bad_json",
              "non_utf8": "bad_text", "missing_question": "missing_question", "truncated_tar": "tar_error"}
#: Kinds whose sample is still used (converted to RGB).
CONVERTED_KINDS = ("grayscale", "cmyk", "rgba", "gray16")
MAX_IMAGE_PIXELS = 1_000_000
BOMB_SIDE = 2000
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 230)}
WORDS = "a red green blue square picture what colour is the it question answer"


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` saved as ``fmt`` bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def image_member(kind: str, colour: tuple[int, int, int], rng: random.Random) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a clean (``kind=""``) or hostile image."""
    if kind == "bad_image":
        return "jpg", bytes(rng.randrange(256) for _ in range(64))
    if kind == "empty_image":
        return "jpg", b""
    if kind == "image_too_large":
        return "png", encode(Image.new("1", (BOMB_SIDE, BOMB_SIDE), 0), "PNG")
    if kind == "grayscale":
        return "jpg", encode(Image.new("L", (16, 16), 128), "JPEG")
    if kind == "cmyk":
        return "jpg", encode(Image.new("CMYK", (16, 16), (0, 200, 200, 30)), "JPEG")
    if kind == "rgba":
        return "png", encode(Image.new("RGBA", (16, 16), (*colour, 100)), "PNG")
    if kind == "gray16":
        return "png", encode(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG")
    return "jpg", encode(Image.new("RGB", (16, 16), colour), "JPEG")


def caption_sample(key: str, kind: str, rng: random.Random) -> dict[str, Any]:
    """A caption sample (``{"__key__", image ext, "txt", "json"}``), hostile as ``kind`` says."""
    name = rng.choice(sorted(COLOURS))
    ext, data = image_member(kind, COLOURS[name], rng)
    caption = f"a {name} square"
    sample = {"__key__": key, ext: data, "txt": caption.encode(), "json": json.dumps({"caption": caption}).encode()}
    if kind == "missing_caption":
        sample.pop("txt")
        sample["json"] = json.dumps({"image_id": key}).encode()
    elif kind == "malformed_json":
        sample["json"] = b'{"caption": "a re'
    elif kind == "non_utf8":
        sample["txt"] = f"a {name} square \xe9t\xe9".encode("latin-1")
    return sample


def vqa_sample(key: str, kind: str, rng: random.Random) -> dict[str, Any]:
    """A VQA sample (``{"__key__", "jpg", "json"}``); ``missing_question`` drops the question."""
    name = rng.choice(sorted(COLOURS))
    meta: dict[str, Any] = {"question": "what colour is it?", "answers": [name] * 10, "question_id": key}
    if kind == "missing_question":
        meta.pop("question")
    return {"__key__": key, "jpg": image_member("", COLOURS[name], rng)[1], "json": json.dumps(meta).encode()}


def truncate_inside_first_member(shard: Path, key: str) -> None:
    """Cut ``shard`` in the middle of the data of sample ``key``'s first member."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.split(".", 1)[0] == key)
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + max(1, member.size // 2))


def write_set(out: Path, prefix: str, count: int, kinds: tuple[str, ...], period: int, shard_size: int,
              rng: random.Random) -> tuple[list[str], list[str]]:
    """Write one shard set; returns the hostile kind per hostile sample and the keys a reader uses."""
    writer = ShardWriter(out, shard_size, prefix=f"{prefix}-")
    make = caption_sample if prefix == "captions" else vqa_sample
    written, used, truncated = [], [], []
    for i in range(count):
        kind = kinds[(i // period) % len(kinds)] if i % period == period - 1 else ""
        key = f"{prefix}{i:05d}"
        writer.write(make(key, kind, rng))
        written.append(kind)
        if kind in ("", *CONVERTED_KINDS):
            used.append(key)
        if kind == "truncated_tar":
            if i % shard_size != shard_size - 1 and i != count - 1:
                raise ValueError(f"truncated_tar must be the last sample of its shard (index {i}, shard_size {shard_size})")
            truncated.append((writer.shards - 1, key))
    writer.close()
    for shard, key in truncated:
        truncate_inside_first_member(out / f"{prefix}-{shard:05d}.tar", key)
    return [k for k in written if k], used


def write_hostile(out: str | Path, captions: int = 200, vqa: int = 40, period: int = 20,
                  shard_size: int = 20, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write the hostile shard set and a word tokenizer into ``out``.

    Args:
        out: output folder (``captions-*.tar``, ``vqa-*.tar``, ``tokenizer/``).
        captions: caption samples; every ``period``-th is hostile (kinds cycle through :data:`CAPTION_KINDS`).
        vqa: VQA samples, same rule over :data:`VQA_KINDS`.
        period: one hostile sample per ``period`` (20 → 5 %).
        shard_size: samples per shard; with the defaults each ``truncated_tar`` sample ends a shard.
        seed: random seed of colours and garbage bytes.
        overwrite: replace an earlier run's files in ``out`` (else ``out`` must be empty; ``datamodules.formats.outputs``).

    Returns:
        ``{"captions", "vqa"}`` shard patterns, ``max_image_pixels``, ``samples``, ``hostile``,
        ``expected`` (count per reason), ``used_keys`` (samples a reader turns into examples).
    """
    out = prepare_output(out, overwrite)
    rng = random.Random(seed)
    cap_kinds, cap_used = write_set(out, "captions", captions, CAPTION_KINDS, period, shard_size, rng)
    vqa_kinds, vqa_used = write_set(out, "vqa", vqa, VQA_KINDS, period, shard_size, rng)
    hostile = cap_kinds + vqa_kinds
    train_word_tokenizer([WORDS], out_dir=out / "tokenizer")
    return write_summary(out, {
        "captions": str(out / "captions-*.tar"), "vqa": str(out / "vqa-*.tar"), "max_image_pixels": MAX_IMAGE_PIXELS,
        "samples": captions + vqa, "hostile": len(hostile), "expected": dict(Counter(COUNTED_AS[k] for k in hostile)),
        "used_keys": cap_used + vqa_used})
