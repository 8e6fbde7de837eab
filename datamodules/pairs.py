"""NLVR2-style shards (two images + a statement → true/false) → :class:`PairBatch`.

A sample is ``{"left.jpg", "right.jpg", "json"}`` (``png``/``jpeg``/``webp`` members work too) with
``json = {"statement": str, "label": bool or "True"/"False", "id": str}``; see
:mod:`datamodules.synthetic.pairs` for a generator. Shape legend: B batch, T text tokens, H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from datamodules.base import WebDataModule
from datamodules.caption_views import TextCollator
from datamodules.image_text import IMAGE_EXTENSIONS, json_field, url_sources
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.transforms import ImageTransform
from mmlm.batch import PairBatch
from mmlm.encoders.base import ImagePreprocess
from mmlm.tokenizers import load_tokenizer

LABELS = {True: 1, False: 0, "true": 1, "false": 0}


def side_image(sample: dict[str, Any], side: str) -> bytes:
    """The ``{side}.{jpg,…}`` member; ``SkipSample("missing_image")`` if absent."""
    for ext in IMAGE_EXTENSIONS:
        if sample.get(f"{side}.{ext}"):
            return sample[f"{side}.{ext}"]
    raise SkipSample("missing_image", f"no {side}.{{{','.join(IMAGE_EXTENSIONS)}}} in {sorted(sample)}")


def pair_label(meta: dict[str, Any]) -> int:
    """``json["label"]`` as 0/1; ``SkipSample("bad_label")`` unless it is a bool or "true"/"false"."""
    label = meta.get("label")
    key = label.lower() if isinstance(label, str) else label
    if key not in LABELS or isinstance(key, int) and not isinstance(key, bool):
        raise SkipSample("bad_label", f"label {label!r} is not true/false")
    return LABELS[key]


@dataclass(frozen=True)
class PairExample:
    """Picklable ``(sample, source) -> (left, right, statement, label, key, id)``."""

    image: ImageTransform

    def __call__(self, sample: dict[str, Any], source: int) -> tuple[Any, ...]:
        meta = json_field(sample)
        statement = meta.get("statement") or meta.get("sentence")
        if not isinstance(statement, str) or not statement.strip():
            raise SkipSample("missing_statement", f"json keys {sorted(meta)}")
        key = sample["__key__"]
        return (self.image(side_image(sample, "left")), self.image(side_image(sample, "right")), statement.strip(),
                pair_label(meta), key, str(meta.get("id", key)))


@dataclass(frozen=True)
class PairCollator:
    """Picklable ``list[example] -> PairBatch`` (statements tokenised by :class:`TextCollator`)."""

    text: TextCollator

    def __call__(self, examples: list[tuple[Any, ...]]) -> PairBatch:
        text = self.text([(e[2], e[4]) for e in examples])
        return PairBatch(torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples]),
                         text.input_ids, text.attention_mask, torch.tensor([e[3] for e in examples]),
                         [e[4] for e in examples], [e[5] for e in examples])


class PairsDataModule(WebDataModule):
    """Pair shards per split (``train_urls``, ``val_urls``, ``test_urls``) → :class:`PairBatch`.

    Args:
        tokenizer: hub id or directory; ``None``: the trainer's module's ``tokenizer``.
        image_size: square side (ImageNet mean/std); ``None``: the module's ``image_preprocess``.
        max_text_tokens: cap on statement + eos tokens.
        train_crop_scale: smallest area fraction of the light random crop in training (no flips: left/right matter).
        batch_size, num_workers, epoch_samples, shuffle_buffer, resampled, seed: as :class:`WebDataModule`.
    """

    def __init__(self, train_urls: str | None = None, val_urls: str | None = None, test_urls: str | None = None,
                 tokenizer: str | None = None, image_size: int | None = None, max_text_tokens: int = 40,
                 train_crop_scale: float = 0.9, batch_size: int = 32, num_workers: int = 0,
                 epoch_samples: int | None = None, shuffle_buffer: int = 1000, resampled: bool = False,
                 seed: int = 0) -> None:
        super().__init__(train=url_sources(train_urls, "caption"), val=url_sources(val_urls, "caption"),
                         test=url_sources(test_urls, "caption"), predict=None, batch_size=batch_size,
                         num_workers=num_workers, epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, seed=seed)
        self.tokenizer_name, self.image_size = tokenizer, image_size
        self.max_text_tokens, self.train_crop_scale = max_text_tokens, train_crop_scale


    def example_fn(self, stage: str, sources: Any) -> PairExample:
        pre = (ImagePreprocess((self.image_size, self.image_size)) if self.image_size is not None
               else self.from_model("image_preprocess", "image_size"))
        return PairExample(ImageTransform.from_preprocess(pre, train=stage == "fit", min_crop_scale=self.train_crop_scale))

    def collate_fn(self, stage: str) -> PairCollator:
        tokenizer = (load_tokenizer(self.tokenizer_name) if self.tokenizer_name is not None
                     else self.from_model("tokenizer", "tokenizer"))
        return PairCollator(TextCollator(tokenizer, self.max_text_tokens))
