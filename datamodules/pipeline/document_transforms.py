"""Document image preprocessing (Donut): resize keeping the aspect ratio, fit inside ``[H, W]``, then pad.

The operations of transformers' ``DonutImageProcessor`` (torchvision backend) on a uint8 ``[3, h, w]`` tensor:

1. ``align_long_axis``: rotate by 90° clockwise (``rot90`` with ``k=3``) when the image's orientation
   (portrait or landscape) differs from the input's;
2. resize (aspect kept) so the shorter edge is ``min(H, W)`` (the longer one truncated to an int);
3. thumbnail: when the image is larger than ``(H, W)``, resize it (aspect kept, truncated) to fit inside;
4. pad with black to ``(H, W)``: centred for evaluation (``(H - h) // 2`` on top), at a random offset for
   training (``random_padding``);
5. rescale by 1/255 and normalise (fused, as the processor does).

Both resizes use the processor's ``resample`` (Donut's is bilinear; ``ImagePreprocess.interpolation``) with
antialias. Nothing is cropped, so no text is lost. With the same bytes, ``random_padding=False`` and full
decoding (evaluation) the tensor equals the processor's ``pixel_values``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as tvF

from datamodules.pipeline.transforms import Normalize, decode_image, pixel_tensor, resize_pixels
from mmlm.encoders.base import INTERPOLATIONS, check_choice


def align_long_axis(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Rotate ``pixels [3, h, w]`` by 90° clockwise (as Donut) when it is landscape and ``size`` ``(H, W)`` is
    portrait, or the other way round; square images or sizes are left alone."""
    height, width = size
    image_h, image_w = pixels.shape[-2:]
    if (height > width and image_w > image_h) or (height < width and image_w < image_h):
        return torch.rot90(pixels, 3, dims=(-2, -1))
    return pixels


def shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """``(h, w)`` of a ``height × width`` image resized so its shorter edge is ``edge`` (the longer one
    truncated to an int)."""
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def thumbnail_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of a ``height × width`` image shrunk to fit inside ``size`` ``(H, W)`` (Donut's thumbnail:
    the bounded edge is clipped, the other one scaled and truncated; unchanged when it already fits). An edge
    truncated to 0 (a sliver, where the processor fails) is kept at 1 pixel."""
    new_h, new_w = min(height, size[0]), min(width, size[1])
    if (new_h, new_w) == (height, width):
        return height, width
    if height > width:
        new_w = max(1, int(width * new_h / height))
    elif width > height:
        new_h = max(1, int(height * new_w / width))
    return new_h, new_w


def pad_offset(free_x: int, free_y: int, random_padding: bool) -> tuple[int, int]:
    """``(left, top)`` of the resized image: centred, or anywhere (uniformly) with ``random_padding``."""
    if random_padding:
        return random.randint(0, free_x), random.randint(0, free_y)
    return free_x // 2, free_y // 2


@dataclass(frozen=True)
class DocumentTransform:
    """Image bytes → normalised ``[3, H, W]`` tensor (Donut's resize, thumbnail and pad; see the module doc).

    Attributes:
        size: ``(H, W)`` model input size.
        mean: per-channel mean of ``[0, 1]`` pixels.
        std: per-channel std.
        align_long_axis: rotate by 90° when the orientation differs from ``size``'s.
        random_padding: place the image at a random offset instead of centring it.
        train: decode large JPEGs in draft mode (faster, slightly different pixels); evaluation decodes fully.
        interpolation: ``"bilinear"`` (Donut's) or ``"bicubic"``, for both resizes.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    align_long_axis: bool = False
    random_padding: bool = False
    train: bool = False
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        object.__setattr__(self, "_normalize", Normalize(self.mean, self.std))

    def resize_and_pad(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [3, h, w]`` uint8 → ``[3, H, W]`` uint8: aligned, resized, fitted and padded."""
        if self.align_long_axis:
            pixels = align_long_axis(pixels, self.size)
        edge = min(self.size)
        pixels = resize_pixels(pixels, shortest_edge_size(*pixels.shape[-2:], edge), self.interpolation)
        pixels = resize_pixels(pixels, thumbnail_size(*pixels.shape[-2:], self.size), self.interpolation)
        free_y, free_x = self.size[0] - pixels.shape[-2], self.size[1] - pixels.shape[-1]
        left, top = pad_offset(free_x, free_y, self.random_padding)
        return tvF.pad(pixels, [left, top, free_x - left, free_y - top])

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode (``SkipSample("bad_image")`` when it fails) and preprocess one image → ``[3, H, W]``
        float32."""
        image = decode_image(data, self.size if self.train else None)
        return self._normalize(self.resize_and_pad(pixel_tensor(image)))
