"""The one interface every vision encoder implements.

Shape legend: B batch, N image tokens, D width, H/W image height/width.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from mmlm.freezing import Freezable


@dataclass(frozen=True)
class ImagePreprocess:
    """Preprocessing metadata that travels with an encoder; datamodules read it from here.

    Attributes:
        size: ``(H, W)`` the encoder expects.
        mean: per-channel mean used to normalise ``[0, 1]`` pixels.
        std: per-channel std.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class VisionEncoder(Freezable):
    """Images ``[B, 3, H, W]`` → token features ``[B, N, D]``.

    Implementations set ``width`` (D), ``num_tokens`` (N) and ``preprocess`` in ``__init__``
    and call ``setup_freezing(freeze, dtype)`` last.
    """

    width: int
    num_tokens: int
    preprocess: ImagePreprocess

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → ``tokens [B, N, D]``. A frozen encoder runs under ``no_grad``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the encoder's parameters (inputs are cast to it)."""
        return next(self.parameters()).dtype
