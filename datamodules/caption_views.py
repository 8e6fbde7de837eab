"""Image-only and text-only streams over caption shards (VLMO stages 1 and 2): the other modality is never decoded.

* :class:`ImageOnlyDataModule`: ``{"jpg"|"png"|…}`` → :class:`ImageBatch` (pixels, keys, ids); text is ignored.
* :class:`TextOnlyDataModule`: ``txt`` (else ``json["caption"]``) → :class:`TextBatch` (``text [SEP]``, right-padded);
  images are never decoded, so text-only epochs are cheap.

Both read the same img2dataset-style shards as :class:`~datamodules.CaptionsDataModule`
(``train_urls``/``val_urls``/``test_urls``). Shape legend: B batch, T text tokens, H/W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from datamodules.base import WebDataModule
from datamodules.image_text import image_bytes, json_field, text_field, url_sources
from datamodules.pipeline.collate import pad_id, pad_right, token_ids
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.transforms import ImageTransform
from mmlm.batch import ImageBatch, TextBatch
from mmlm.encoders.base import ImagePreprocess
from mmlm.tokenizers import load_tokenizer


def caption_text(sample: dict[str, Any]) -> str:
    """The caption of a sample (``txt``, else ``json["caption"]``); ``SkipSample("missing_caption")`` without one."""
    caption = text_field(sample, "txt")
    if not caption:
        meta_caption = json_field(sample).get("caption")
        caption = meta_caption.strip() if isinstance(meta_caption, str) else ""
    if not caption:
        raise SkipSample("missing_caption", "no txt and no json caption")
    return caption


@dataclass(frozen=True)
class ImageExample:
    """Picklable ``(sample, source) -> (pixels [3, H, W], key, id)``."""

    image: ImageTransform

    def __call__(self, sample: dict[str, Any], source: int) -> tuple[torch.Tensor, str, str]:
        image_id = json_field(sample).get("image_id")
        key = sample["__key__"]
        return self.image(image_bytes(sample)), key, str(image_id) if image_id is not None else key


def collate_images(examples: list[tuple[torch.Tensor, str, str]]) -> ImageBatch:
    """Stack image examples into an :class:`ImageBatch`."""
    return ImageBatch(torch.stack([e[0] for e in examples]), [e[1] for e in examples], [e[2] for e in examples])


def text_example(sample: dict[str, Any], source: int) -> tuple[str, str]:
    """``(caption, key)`` of a caption sample (the image is never decoded)."""
    return caption_text(sample), sample["__key__"]


@dataclass(frozen=True)
class TextCollator:
    """Picklable ``list[(text, key)] -> TextBatch``: ``text eos`` cut to ``max_text_tokens`` (eos kept)."""

    tokenizer: Any
    max_text_tokens: int

    def __call__(self, examples: list[tuple[str, str]]) -> TextBatch:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{type(self.tokenizer).__name__} has no eos token id to end texts")
        rows = [ids[: self.max_text_tokens - 1] + [eos] for ids in token_ids(self.tokenizer, [e[0] for e in examples])]
        return TextBatch(pad_right(rows, pad_id(self.tokenizer)), pad_right([[1] * len(r) for r in rows], 0),
                         [e[1] for e in examples])


class _CaptionShardsModule(WebDataModule):
    """Caption shards per split; shared arguments of the two unimodal modules."""

    def __init__(self, train_urls: str | None = None, val_urls: str | None = None, test_urls: str | None = None,
                 batch_size: int = 32, num_workers: int = 0, epoch_samples: int | None = None,
                 shuffle_buffer: int = 1000, resampled: bool = False, seed: int = 0) -> None:
        super().__init__(train=url_sources(train_urls, "caption"), val=url_sources(val_urls, "caption"),
                         test=url_sources(test_urls, "caption"), predict=None, batch_size=batch_size,
                         num_workers=num_workers, epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, seed=seed)


class ImageOnlyDataModule(_CaptionShardsModule):
    """Images of caption shards (text ignored) → :class:`ImageBatch`.

    Args:
        image_size: square side (ImageNet mean/std); ``None``: the trainer's module's ``image_preprocess``.
        train_crop_scale: smallest area fraction of the light random crop in training (1: centre crop).
        **kwargs: shard and loader arguments (``train_urls``, ``val_urls``, ``test_urls``, ``batch_size`` …).
    """

    def __init__(self, image_size: int | None = None, train_crop_scale: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size, self.train_crop_scale = image_size, train_crop_scale

    def example_fn(self, stage: str, sources: Any) -> ImageExample:
        pre = (ImagePreprocess((self.image_size, self.image_size)) if self.image_size is not None
               else self.from_model("image_preprocess", "image_size"))
        return ImageExample(ImageTransform.from_preprocess(pre, train=stage == "fit",
                                                           min_crop_scale=self.train_crop_scale))

    def collate_fn(self, stage: str) -> Any:
        return collate_images


class TextOnlyDataModule(_CaptionShardsModule):
    """Captions of caption shards (images never decoded) → :class:`TextBatch`.

    Args:
        tokenizer: hub id or directory; ``None``: the trainer's module's ``tokenizer``.
        max_text_tokens: cap on text + eos tokens.
        **kwargs: shard and loader arguments (``train_urls``, ``val_urls``, ``test_urls``, ``batch_size`` …).
    """

    def __init__(self, tokenizer: str | None = None, max_text_tokens: int = 40, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer_name, self.max_text_tokens = tokenizer, max_text_tokens

    def example_fn(self, stage: str, sources: Any) -> Any:
        return text_example

    def collate_fn(self, stage: str) -> TextCollator:
        tokenizer = (load_tokenizer(self.tokenizer_name) if self.tokenizer_name is not None
                     else self.from_model("tokenizer", "tokenizer"))
        return TextCollator(tokenizer, self.max_text_tokens)
