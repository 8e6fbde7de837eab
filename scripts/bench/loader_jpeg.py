"""Loader on real-size JPEGs: mmlm's ``ImageTextDataModule`` vs open_clip's training pipeline.

Shards of 640×480 JPEGs (COCO's typical size, quality 90; smooth random colour fields with a few filled shapes, so
the files have COCO-like entropy: ~40–60 KB) with one caption each. Both sides read the same shards (resampled, same
shuffle buffer), take a random resized crop of 90–100 % of the area (open_clip's ``scale=(0.9, 1.0)``), resize to
224 px (ViT) or 384 px, normalise, tokenise the caption and batch 32 samples. Reference: open_clip's
``get_wds_dataset`` steps written out (``wds.decode("pilrgb")``: a full PIL decode, then
``open_clip.image_transform(size, is_train=True)``: torchvision's ``RandomResizedCrop`` (bicubic), ``ToTensor``,
``Normalize``), batched by webdataset, in a ``WebLoader``. mmlm: its datamodule as a training config builds it
(draft JPEG decode at the smallest DCT scale that still covers the crop, decode after the shuffle buffer), also
building labels and left-padded prompts. Images/s are steady state (the clock starts at the first batch), at 0, 1
and 2 workers. Toy scale: 320×240 JPEGs to 64 px.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from common import Scale, alternate, row
from loader import throughput
from PIL import Image, ImageDraw

from datamodules import ImageTextDataModule, Source
from datamodules.pipeline.urls import expand_urls
from mmlm.tokenizers import load_tokenizer

BUFFER = 256
BATCH = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 230), "yellow": (245, 200, 20)}


def image_bytes(rng: np.random.Generator, width: int, height: int) -> tuple[bytes, str]:
    """A JPEG of a smooth random colour field with 1–3 shapes (quality 90) and its caption."""
    field = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    draw, words = ImageDraw.Draw(image), []
    for _ in range(int(rng.integers(1, 4))):
        shape, colour = SHAPES[int(rng.integers(3))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        x, y, r = int(rng.integers(60, width - 60)), int(rng.integers(60, height - 60)), int(rng.integers(20, 60))
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        words.append(f"a {colour} {shape}")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), " and ".join(words) + "."


def write_jpeg_shards(out: Path, scale: Scale) -> Path:
    """Caption shards of real-size JPEGs under ``out`` (once); returns the folder."""
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    width, height = (320, 240) if scale.name == "toy" else (640, 480)
    count = 32 if scale.name == "toy" else 256
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "jpeg-%05d.tar"), maxcount=64, verbose=0) as sink:
        for index in range(count):
            jpg, caption = image_bytes(rng, width, height)
            sink.write({"__key__": f"{index:06d}", "jpg": jpg, "txt": caption,
                        "json": json.dumps({"caption": caption, "captions": [caption]})})
    (out / "done").write_text("")
    return out


def mmlm_loader(shards: Path, tokenizer: Path, size: int, workers: int, samples: int) -> Any:
    """mmlm's training loader over the JPEG shards."""
    module = ImageTextDataModule(train=[Source(str(shards / "jpeg-*.tar"), kind="caption")], tokenizer=str(tokenizer),
                                 image_size=size, batch_size=BATCH, num_workers=workers, epoch_samples=samples,
                                 shuffle_buffer=BUFFER, resampled=True, train_crop_scale=0.9, max_text_tokens=48)
    module.setup("fit")
    return module.train_dataloader()


class Tokenize:
    """Caption → token ids (open_clip's pipeline tokenises in ``map_dict``)."""

    def __init__(self, tokenizer: Path) -> None:
        self.tokenizer = load_tokenizer(tokenizer)

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:48]


def open_clip_loader(shards: Path, tokenizer: Path, size: int, workers: int, samples: int) -> Any:
    """open_clip's ``get_wds_dataset`` training pipeline (decode "pilrgb", ``image_transform``, batched)."""
    import open_clip

    preprocess = open_clip.image_transform(size, is_train=True)
    per_worker = max(1, samples // BATCH // max(1, workers))
    dataset = (wds.WebDataset(expand_urls(str(shards / "jpeg-*.tar")), resampled=True, shardshuffle=False,
                              nodesplitter=None, seed=0)
               .shuffle(BUFFER, initial=BUFFER).decode("pilrgb").rename(image="jpg", text="txt")
               .map_dict(image=preprocess, text=Tokenize(tokenizer)).to_tuple("image", "text")
               .batched(BATCH, partial=False).map(as_dict).with_epoch(per_worker))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def as_dict(batch: tuple[Any, Any]) -> dict[str, Any]:
    """webdataset's ``(images [B, 3, S, S], token lists)`` batch as a dict (counted by its ``pixels``)."""
    return {"pixels": batch[0], "input_ids": batch[1]}


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row per output size and ``num_workers``."""
    shards = write_jpeg_shards(data / ("jpeg320" if scale.name == "toy" else "jpeg640"), scale)
    tokenizer = data / "tokenizer"
    sizes = (64,) if scale.name == "toy" else (224, 384)
    samples = BATCH * (2 if scale.name == "toy" else 16)
    rows = []
    for size in sizes:
        for workers in scale.loader_workers:
            speed = alternate({
                "mmlm": lambda w=workers, s=size: throughput(mmlm_loader(shards, tokenizer, s, w, samples), samples),
                "reference": lambda w=workers, s=size: throughput(open_clip_loader(shards, tokenizer, s, w, samples),
                                                                  samples)}, min(scale.repeats, 3))
            source = "320×240" if scale.name == "toy" else "640×480"
            rows.append(row(f"loader, {source} JPEG → {size} px, num_workers={workers} (vs open_clip's pipeline)",
                            speed["mmlm"], speed["reference"], "images/s", speed["mmlm"] / speed["reference"],
                            ">= 1.5"))
    return rows
