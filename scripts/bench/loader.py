"""Loader throughput: mmlm's ``ImageTextDataModule`` vs a plain webdataset pipeline written by hand.

Both sides read the same caption shards (resampled, same shuffle buffer), decode the JPEG, resize to 64 px
(centre box), normalise with ImageNet statistics, tokenize ``prompt + target`` and collate ids, labels and
left-padded prompts. Samples/s are steady-state: the clock starts when the first batch arrives (worker
start-up excluded, the same for both). A second row pair times the reduced-size JPEG decode
(``Image.draft``) of :mod:`datamodules.pipeline.transforms` against a full decode + resize on 256 px JPEGs.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from common import Scale, alternate, captions_glob, row
from PIL import Image

from datamodules import ImageTextDataModule, Source
from datamodules.pipeline.transforms import ImageTransform
from datamodules.pipeline.urls import expand_urls
from mmlm.encoders.base import ImagePreprocess
from mmlm.tokenizers import load_tokenizer

SIZE = 64
PROMPT = "a picture of"
BUFFER = 256
MAX_TOKENS = 48


def throughput(loader: Any, samples: int) -> float:
    """Samples/s of ``loader`` after its first batch (steady state)."""
    iterator = iter(loader)
    first = next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["pixels"]) if isinstance(batch, dict) else len(batch)
    del first
    return count / max(time.perf_counter() - start, 1e-9)


def mmlm_loader(data: Path, batch_size: int, workers: int, samples: int) -> Any:
    """mmlm's training loader over the caption shards."""
    module = ImageTextDataModule(train=[Source(captions_glob(data), kind="caption")], tokenizer=str(data / "tokenizer"),
                                 image_size=SIZE, batch_size=batch_size, num_workers=workers, epoch_samples=samples,
                                 shuffle_buffer=BUFFER, resampled=True, caption_prompt=PROMPT, train_crop_scale=1.0,
                                 max_text_tokens=MAX_TOKENS)
    module.setup("fit")
    return module.train_dataloader()


class HandExample:
    """Reference sample → dict: full PIL decode, resize, normalise; caption text and references."""

    mean = torch.tensor(ImagePreprocess((SIZE, SIZE)).mean)[:, None, None]
    std = torch.tensor(ImagePreprocess((SIZE, SIZE)).std)[:, None, None]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        meta = json.loads(sample["json"])
        return {"pixels": (pixels - self.mean) / self.std, "target": sample["txt"].decode().strip(),
                "references": meta.get("captions", [])}


class HandCollate:
    """Reference collate: ``[bos] prompt target eos`` right-padded with labels, prompts left-padded."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.tokenizer
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        prompt = [bos] + tok(PROMPT, add_special_tokens=False)["input_ids"]
        targets = tok([" " + e["target"] for e in examples], add_special_tokens=False)["input_ids"]
        rows = [(prompt + list(t))[: MAX_TOKENS - 1] + [eos] for t in targets]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, len(prompt): len(r)] = ids[i, len(prompt): len(r)]
            mask[i, : len(r)] = 1
        prompts = torch.tensor([prompt] * len(rows))
        return {"pixels": torch.stack([e["pixels"] for e in examples]), "input_ids": ids, "attention_mask": mask,
                "labels": labels, "prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts),
                "references": [e["references"] for e in examples]}


def hand_loader(data: Path, batch_size: int, workers: int, samples: int) -> Any:
    """The same work as a plain webdataset pipeline (resampled shards, shuffle, map, batched)."""
    tokenizer = load_tokenizer(data / "tokenizer")
    per_worker = max(1, samples // batch_size // max(1, workers))
    dataset = (wds.WebDataset(expand_urls(captions_glob(data)), resampled=True, shardshuffle=False,
                              nodesplitter=None, seed=0)
               .shuffle(BUFFER, initial=BUFFER).map(HandExample())
               .batched(batch_size, collation_fn=HandCollate(tokenizer), partial=False).with_epoch(per_worker))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def jpeg_rows(data: Path, scale: Scale) -> list[dict[str, Any]]:
    """Reduced-size decode (draft) vs full decode + resize, on shapes images re-encoded at 256 px."""
    urls = expand_urls(captions_glob(data))
    large = []
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC).save(
            buffer, format="JPEG", quality=90)
        large.append(buffer.getvalue())
        if len(large) == scale.jpeg_images:
            break
    pre = ImagePreprocess((SIZE, SIZE))
    # training decodes JPEGs in draft mode (evaluation decodes fully, as the reference processors); no random crop
    transform = ImageTransform.from_preprocess(pre, train=True, min_crop_scale=1.0)
    reference = HandExample()

    def draft() -> float:
        start = time.perf_counter()
        for blob in large:
            transform(blob)
        return len(large) / (time.perf_counter() - start)

    def full() -> float:
        start = time.perf_counter()
        for blob in large:
            reference({"jpg": blob, "json": b"{}", "txt": b""})
        return len(large) / (time.perf_counter() - start)

    speed = alternate({"mmlm": draft, "reference": full}, scale.repeats)
    return [row("jpeg decode 256→64 px (draft vs full)", speed["mmlm"], speed["reference"], "images/s",
                speed["mmlm"] / speed["reference"], ">= 1.3")]


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """Loader rows (one per ``num_workers``) and the JPEG reduced-size decode row."""
    rows = []
    for workers in scale.loader_workers:
        sides = {
            "mmlm": lambda w=workers: throughput(mmlm_loader(data, scale.batch_size, w, scale.loader_samples),
                                                 scale.loader_samples),
            "reference": lambda w=workers: throughput(hand_loader(data, scale.batch_size, w, scale.loader_samples),
                                                      scale.loader_samples),
        }
        speed = alternate(sides, scale.repeats)
        rows.append(row(f"loader, num_workers={workers}", speed["mmlm"], speed["reference"], "samples/s",
                        speed["mmlm"] / speed["reference"], ">= 0.95"))
    return rows + jpeg_rows(data, scale)
