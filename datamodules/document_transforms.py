"""Document image preprocessing (Donut): fit inside ``[H, W]`` keeping the aspect ratio, then pad.

Donut's ``prepare_input``: optionally rotate the image by 90° when its orientation (portrait or
landscape) differs from the input's (``align_long_axis``), shrink or enlarge it to fit inside
``(H, W)`` keeping its aspect ratio, then pad to ``(H, W)`` — centred for evaluation, at a random
offset for training (``random_padding``) — and normalise. Nothing is cropped, so no text is lost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image

from datamodules.transforms import channel_tensor, decode_image, to_tensor


def align_long_axis(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Rotate ``image`` by 90° (clockwise, as Donut) when it is landscape and ``size`` ``(H, W)`` is
    portrait, or the other way round; square images or sizes are left alone."""
    height, width = size
    if (height > width and image.width > image.height) or (height < width and image.width < image.height):
        return image.rotate(-90, expand=True)
    return image


def fit_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """``(w, h)`` of a ``width × height`` image scaled to fit inside ``size`` ``(H, W)`` (aspect kept, ≥ 1)."""
    scale = min(size[1] / width, size[0] / height)
    return max(1, min(size[1], round(width * scale))), max(1, min(size[0], round(height * scale)))


def pad_offset(free_x: int, free_y: int, random_padding: bool) -> tuple[int, int]:
    """Where the resized image goes: centred, or anywhere (uniformly) with ``random_padding``."""
    if random_padding:
        return random.randint(0, free_x), random.randint(0, free_y)
    return free_x // 2, free_y // 2


@dataclass(frozen=True)
class DocumentTransform:
    """Image bytes → normalised ``[3, H, W]`` tensor (Donut's resize-and-pad; see the module docstring).

    Attributes:
        size: ``(H, W)`` model input size.
        mean: per-channel mean of ``[0, 1]`` pixels.
        std: per-channel std.
        align_long_axis: rotate by 90° when the orientation differs from ``size``'s.
        random_padding: place the image at a random offset (training) instead of centring it.
        fill: RGB value of the padding (Donut pads with black).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    align_long_axis: bool = False
    random_padding: bool = False
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mean", channel_tensor(self.mean))
        object.__setattr__(self, "_std", channel_tensor(self.std))

    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """The ``(H, W)`` RGB image: aligned, fitted and padded."""
        if self.align_long_axis:
            image = align_long_axis(image, self.size)
        width, height = fit_size(image.width, image.height, self.size)
        resized = image.resize((width, height), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (self.size[1], self.size[0]), self.fill)
        canvas.paste(resized, pad_offset(self.size[1] - width, self.size[0] - height, self.random_padding))
        return canvas

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode (``SkipSample("bad_image")`` when it fails) and preprocess one image."""
        return to_tensor(self.resize_and_pad(decode_image(data, self.size)), self._mean, self._std)
