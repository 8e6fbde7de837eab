"""The one interface every vision encoder implements.

Shape legend: B batch, N image tokens, D width, H/W image height/width.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmlm.freezing import Freezable

#: Resize modes of :class:`ImagePreprocess`: ``"crop"`` resizes to cover ``size`` (aspect kept) and
#: centre-crops; ``"squash"`` resizes to exactly ``size`` without cropping or keeping the aspect (BLIP-2's
#: ``BlipImageProcessor``).
RESIZE_MODES = ("crop", "squash")
#: Interpolations of :class:`ImagePreprocess` and their PIL resample codes (an HF image processor's
#: ``resample``).
INTERPOLATIONS = {"bilinear": 2, "bicubic": 3}


def check_choice(field: str, value: str, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` naming ``field`` when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")


def interpolation_of(resample: Any) -> str:
    """An HF image processor's ``resample`` (PIL code, ``PILImageResampling`` or torchvision
    ``InterpolationMode``) → ``"bilinear"``/``"bicubic"``; any other raises ``ValueError`` naming
    ``resample``."""
    value = getattr(resample, "value", resample)
    names = {code: name for name, code in INTERPOLATIONS.items()}
    name = value if isinstance(value, str) else names.get(value)
    if name not in INTERPOLATIONS:
        raise ValueError(f"image processor resample={resample!r} is not supported (only "
                         f"{', '.join(f'{n} ({c})' for n, c in INTERPOLATIONS.items())})")
    return name


@dataclass(frozen=True)
class ImagePreprocess:
    """Preprocessing metadata that travels with an encoder; datamodules read it from here.

    Attributes:
        size: ``(H, W)`` the encoder expects.
        mean: per-channel mean used to normalise ``[0, 1]`` pixels.
        std: per-channel std.
        resize: ``"crop"`` (cover ``size`` keeping the aspect, centre-crop; the default of every family) or
            ``"squash"`` (resize to exactly ``size``, no crop, aspect not kept: ``BlipImageProcessor``).
            Document models (Donut) ignore it: their datamodule fits and pads
            (:mod:`datamodules.pipeline.document_transforms`).
        interpolation: ``"bicubic"`` or ``"bilinear"`` (an HF processor's ``resample`` 3 or 2).

    Raises:
        ValueError: ``resize`` or ``interpolation`` is not one of its choices (the message names the field).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = "crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)


class VisionEncoder(Freezable):
    """Images ``[B, 3, H, W]`` → token features ``[B, N, D]``.

    Implementations set ``width`` (D), ``num_tokens`` (N) and ``preprocess`` in ``__init__``, name the blocks
    ``trainable_blocks`` may leave trainable with :meth:`keep_blocks_trainable`, and call
    ``setup_freezing(freeze, dtype)`` last.
    """

    width: int
    num_tokens: int
    preprocess: ImagePreprocess
    trainable_blocks: int = 0

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the forward never reaches (blocks after ``layer``, a final norm the output is read before); they
        get no gradient, so a part that trains the encoder leaves them frozen (DDP would stop at them). None here."""
        return []

    def keep_blocks_trainable(self, count: int, freeze: bool, blocks: Sequence[nn.Module] | None,
                              norm: nn.Module | None = None) -> None:
        """With ``freeze``, leave the last ``count`` of ``blocks`` (and ``norm``, the final norm the output goes
        through, if any) trainable: :func:`mmlm.freezing.freeze_` keeps them so and they follow train/eval mode,
        while the rest stays frozen in eval mode; the forward then records the graph from the first trainable block
        on (earlier blocks see no tensor that needs a gradient). ``count = 0`` changes nothing.

        Raises:
            ValueError: ``count`` is negative or larger than ``len(blocks)``, given without ``freeze`` (an unfrozen
                encoder trains every block), or the encoder has no block list (``blocks`` is ``None``).
        """
        if count == 0:
            self._kept_trainable: list[nn.Module] = []
            return
        name = type(self).__name__
        if not freeze:
            raise ValueError(f"{name}: trainable_blocks={count} needs freeze: true (an unfrozen encoder trains "
                             "all its blocks)")
        if blocks is None:
            raise ValueError(f"{name}: trainable_blocks={count} is not supported for this model (no list of "
                             "transformer blocks found)")
        if not 0 < count <= len(blocks):
            raise ValueError(f"{name}: trainable_blocks={count} must be between 0 and the {len(blocks)} blocks kept")
        self.trainable_blocks = count
        norms = [norm] if norm is not None and any(True for _ in norm.parameters()) else []
        self._kept_trainable = list(blocks)[-count:] + norms

    def adapters(self) -> list[nn.Module]:
        """The blocks (and final norm) ``trainable_blocks`` keeps trainable when frozen; ``[]`` otherwise."""
        return list(getattr(self, "_kept_trainable", []))

    @property
    def no_grad_forward(self) -> bool:
        """Whether the forward runs under ``no_grad``: frozen, and no block kept trainable."""
        return self.frozen and not self.adapters()

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → ``tokens [B, N, D]``. A frozen encoder runs under ``no_grad``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the encoder's parameters (inputs are cast to it)."""
        return next(self.parameters()).dtype
