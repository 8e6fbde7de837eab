"""DINO's multi-crop views for training and labelled single views for k-NN evaluation, over image shards.

* Training: each image → ``G = 2`` global crops (random resized crop, area 0.4–1, at the encoder's size) and ``L`` local
  crops (area 0.05–0.4, 96 px) with the paper's augmentations (``DataAugmentationDINO``): horizontal flip, colour jitter
  (0.4, 0.4, 0.2, 0.1; p = 0.8), grayscale (p = 0.2), Gaussian blur (radius 0.1–2; p = 1 on the first global crop, 0.1
  on the second, 0.5 on local crops), solarisation (p = 0.2, second global crop only) → :class:`mmlm.ssl.MultiCropBatch`.
* Evaluation: resize (shorter side ``size · eval_resize_ratio``, 256/224 as DINO) and centre crop → one view with its
  labels → :class:`mmlm.ssl.LabelledImageBatch`; the ``bank`` shards (labelled memory) and the ``val`` shards (queries)
  are two validation loaders.

Labels: with ``label_words`` (``{name: [word, …]}``), each label set's label is the index of the one word of its list
that the caption (``txt``, else ``json["caption"]``) contains (a whole word, plural ``s`` allowed); an image whose
caption names none or several of them has no label of that set (``-1``). Without ``label_words``: the integer ``cls``
member (ImageNet webdataset shards), as the label set ``class``. Shape legend: B batch, G/L global/local crops.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from datamodules.base import WebDataModule
from datamodules.caption_views import caption_text
from datamodules.image_text import image_bytes
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.transforms import decode_image
from mmlm.encoders.base import ImagePreprocess
from mmlm.ssl import LabelledImageBatch, MultiCropBatch

#: The label set of ``cls`` members (no ``label_words``).
CLASS_LABEL = "class"


class RandomBlur:
    """PIL Gaussian blur with a uniform radius in ``[low, high]``, applied with probability ``p`` (DINO's)."""

    def __init__(self, p: float, low: float = 0.1, high: float = 2.0) -> None:
        self.p, self.low, self.high = p, low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))


class RandomSolarize:
    """PIL solarisation (threshold 128) with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


def view(size: int, scale: tuple[float, float], blur: float, solarize: float, normalize: T.Compose) -> T.Compose:
    """One DINO view: random resized crop (bicubic), flip, colour jitter, grayscale, blur, solarisation, normalise."""
    steps: list[Any] = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(p=0.5),
                        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                        T.RandomGrayscale(p=0.2), RandomBlur(blur)]
    if solarize > 0:
        steps.append(RandomSolarize(solarize))
    return T.Compose([*steps, normalize])


@dataclass(frozen=True)
class MultiCropTransform:
    """Image bytes → ``(global crops [G, 3, H, W], local crops [L, 3, h, w])`` (see the module docstring).

    Attributes:
        global_size: side of the global crops (the encoder's input size).
        local_size: side of the local crops.
        local_crops: number of local crops ``L`` (0: none).
        global_scale: area range of the global crops.
        local_scale: area range of the local crops.
        mean: per-channel mean.
        std: per-channel std.
    """

    global_size: int
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        normalize = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        views = (view(self.global_size, self.global_scale, 1.0, 0.0, normalize),
                 view(self.global_size, self.global_scale, 0.1, 0.2, normalize),
                 view(self.local_size, self.local_scale, 0.5, 0.0, normalize))
        object.__setattr__(self, "_views", views)

    def __call__(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(data, draft_size=(2 * self.global_size, 2 * self.global_size))
        first, second, local = self._views  # type: ignore[attr-defined]
        local_crops = [local(image) for _ in range(self.local_crops)]
        locals_ = torch.stack(local_crops) if local_crops else torch.zeros(0, 3, self.local_size, self.local_size)
        return torch.stack([first(image), second(image)]), locals_


@dataclass(frozen=True)
class EvalView:
    """Image bytes → ``[3, size, size]``: bicubic resize of the shorter side to ``size · resize_ratio``, centre crop."""

    size: int
    resize_ratio: float = 256 / 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __call__(self, data: bytes) -> torch.Tensor:
        pipeline = T.Compose([T.Resize(round(self.size * self.resize_ratio), interpolation=T.InterpolationMode.BICUBIC),
                              T.CenterCrop(self.size), T.ToTensor(), T.Normalize(self.mean, self.std)])
        return pipeline(decode_image(data))


@dataclass(frozen=True)
class CaptionLabels:
    """Sample → one label per set (see the module docstring); ``words`` ``None`` reads the ``cls`` member.

    Raises (when called):
        SkipSample: ``missing_label`` (no ``cls``) or ``bad_label`` (``cls`` not an integer), without ``words``.
    """

    words: dict[str, tuple[str, ...]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.words) if self.words else [CLASS_LABEL]

    def __call__(self, sample: dict[str, Any]) -> list[int]:
        if not self.words:
            return [class_label(sample)]
        caption = caption_text(sample).lower()
        return [unique_word(caption, words) for words in self.words.values()]


def unique_word(caption: str, words: tuple[str, ...]) -> int:
    """Index of the only word of ``words`` that ``caption`` contains (whole word, optional plural ``s``), else -1."""
    found = [i for i, word in enumerate(words) if re.search(rf"\b{re.escape(word.lower())}s?\b", caption)]
    return found[0] if len(found) == 1 else -1


def class_label(sample: dict[str, Any]) -> int:
    """The integer ``cls`` member of a sample (ImageNet webdataset shards)."""
    data = sample.get("cls")
    if data is None:
        raise SkipSample("missing_label", "no cls member (or give label_words)")
    try:
        return int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError) as exn:
        raise SkipSample("bad_label", f"cls: {exn}") from exn


@dataclass(frozen=True)
class RoleSource:
    """Evaluation shards with their k-NN role (``"bank"`` or ``"query"``)."""

    urls: str
    role: str
    weight: float = 1.0


@dataclass(frozen=True)
class MultiCropExample:
    """Picklable ``(sample, source) -> (global crops, local crops, key)``."""

    transform: MultiCropTransform

    def __call__(self, sample: dict[str, Any], source: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return (*self.transform(image_bytes(sample)), sample["__key__"])


@dataclass(frozen=True)
class LabelledExample:
    """Picklable ``(sample, source) -> (pixels, labels, key, role, label names)``."""

    view: EvalView
    labels: CaptionLabels
    role: str

    def __call__(self, sample: dict[str, Any], source: int) -> tuple[torch.Tensor, list[int], str, str, list[str]]:
        labels = self.labels(sample)
        return self.view(image_bytes(sample)), labels, sample["__key__"], self.role, self.labels.names


def collate_crops(examples: list[tuple[torch.Tensor, torch.Tensor, str]]) -> MultiCropBatch:
    """Stack multi-crop examples into a :class:`MultiCropBatch`."""
    return MultiCropBatch(torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples]),
                          [e[2] for e in examples])


def collate_labelled(examples: list[tuple[torch.Tensor, list[int], str, str, list[str]]]) -> LabelledImageBatch:
    """Stack labelled examples (of one loader, so of one role) into a :class:`LabelledImageBatch`."""
    return LabelledImageBatch(torch.stack([e[0] for e in examples]), torch.tensor([e[1] for e in examples]),
                              examples[0][4], examples[0][3], [e[2] for e in examples])


class MultiCropDataModule(WebDataModule):
    """Image shards → DINO multi-crop training batches and labelled k-NN evaluation batches.

    Args:
        train_urls: training image shards (labels unused).
        val_urls: labelled query shards of validation.
        bank_urls: labelled memory shards of k-NN evaluation (the training split, evaluated without augmentation).
        test_urls: labelled query shards of test (against ``bank_urls``).
        label_words: ``{label set: [word, …]}`` read from captions; ``None``: the ``cls`` member.
        global_size: side of global crops and evaluation views; ``None``: the model's encoder input size.
        local_size: side of local crops.
        local_crops: local crops per image (8 in the paper; 0: global crops only).
        global_scale: area range of global crops.
        local_scale: area range of local crops.
        eval_resize_ratio: evaluation resizes the shorter side to ``size · ratio`` before the centre crop.
        **kwargs: loader arguments (``batch_size``, ``num_workers``, ``epoch_samples``, ``shuffle_buffer``,
            ``resampled``, ``seed``).
    """

    def __init__(self, train_urls: str | None = None, val_urls: str | None = None, bank_urls: str | None = None,
                 test_urls: str | None = None, label_words: dict[str, list[str]] | None = None,
                 global_size: int | None = None, local_size: int = 96, local_crops: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 eval_resize_ratio: float = 256 / 224, batch_size: int = 64, num_workers: int = 0,
                 epoch_samples: int | None = None, shuffle_buffer: int = 1000, resampled: bool = False,
                 seed: int = 0) -> None:
        def evaluation(urls: str | None) -> list[RoleSource] | None:
            return [RoleSource(bank_urls, "bank"), RoleSource(urls, "query")] if urls and bank_urls else None

        super().__init__(train=[RoleSource(train_urls, "train")] if train_urls else None, val=evaluation(val_urls),
                         test=evaluation(test_urls), predict=None, batch_size=batch_size, num_workers=num_workers,
                         epoch_samples=epoch_samples, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        self.labels = CaptionLabels({k: tuple(v) for k, v in label_words.items()} if label_words else None)
        self.global_size, self.local_size, self.local_crops = global_size, local_size, local_crops
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.eval_resize_ratio = eval_resize_ratio

    def preprocess(self) -> ImagePreprocess:
        if self.global_size is not None:
            return ImagePreprocess((self.global_size, self.global_size))
        return self.from_model("image_preprocess", "global_size")

    def example_fn(self, stage: str, sources: Any) -> MultiCropExample | LabelledExample:
        pre = self.preprocess()
        if stage == "fit":
            return MultiCropExample(MultiCropTransform(pre.size[0], self.local_size, self.local_crops,
                                                       self.global_scale, self.local_scale, pre.mean, pre.std))
        return LabelledExample(EvalView(pre.size[0], self.eval_resize_ratio, pre.mean, pre.std), self.labels,
                               sources[0].role)

    def collate_fn(self, stage: str) -> Any:
        return collate_crops if stage == "fit" else collate_labelled
