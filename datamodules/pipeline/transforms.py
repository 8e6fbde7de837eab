"""Image decoding and preprocessing: bytes → RGB ``PIL.Image`` → normalised ``[3, H, W]`` tensor.

Decoding happens after the shuffle buffer (the buffer holds raw bytes). Any PIL mode is turned
into RGB: palette/alpha images are composited on white, 16/32-bit grayscale is scaled to 8 bit,
CMYK/YCbCr/L/1 go through ``convert("RGB")``. Training decodes JPEGs at least twice the target size
at reduced size with ``Image.draft`` (DCT scaling: several times faster on large photos; the pixels differ
slightly from a full decode). Evaluation always decodes fully, as a user of the reference processor does
(``Image.open(path).convert("RGB")``), so evaluation pixels equal the reference's. No flips: captions say
"left" and "right".

Two resize modes (:class:`mmlm.encoders.base.ImagePreprocess` ``resize``): ``"crop"`` (cover the target size,
aspect kept, centre crop; PIL) and ``"squash"`` (resize to exactly the target size, aspect not kept, no
crop: ``transformers.BlipImageProcessor``'s operations on a uint8 tensor — torchvision ``resize`` with
antialias, then the fused rescale + normalise — so the tensor equals its ``pixel_values``).

Hostile inputs: zero-byte data is skipped as ``empty_image``, undecodable or truncated data as
``bad_image``, an image with more than ``max_pixels`` pixels (checked from the header, before
any pixel is decoded: a decompression bomb) as ``image_too_large``. Every conversion to RGB is
counted as ``converted_<kind>`` (``grayscale``, ``cmyk``, ``alpha``, ``16bit``, ``palette``…)
through :func:`datamodules.pipeline.skips.note`.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvF

from datamodules.pipeline.skips import SkipSample, note
from mmlm.encoders.base import INTERPOLATIONS, RESIZE_MODES, ImagePreprocess, check_choice

#: Errors PIL raises for corrupt or truncated images.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: Default pixel limit of one image (PIL's own warning threshold, ~89.5 M pixels; e.g. 9459 × 9459).
MAX_IMAGE_PIXELS = 89_478_485
#: Name counted (``converted_<name>``) for each PIL mode that is converted to RGB.
CONVERSION_KINDS = {"L": "grayscale", "1": "grayscale", "LA": "alpha", "La": "alpha", "RGBA": "alpha",
                    "RGBa": "alpha", "PA": "alpha", "P": "palette", "CMYK": "cmyk", "YCbCr": "ycbcr",
                    "I": "16bit", "I;16": "16bit", "I;16B": "16bit", "I;16L": "16bit", "I;16N": "16bit",
                    "F": "float", "RGBX": "rgbx", "LAB": "lab", "HSV": "hsv"}
#: PIL resampling and torchvision interpolation of each ``ImagePreprocess.interpolation``.
PIL_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
TORCH_INTERPOLATION = {"bilinear": tvF.InterpolationMode.BILINEAR, "bicubic": tvF.InterpolationMode.BICUBIC}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white; 16/32-bit gray rescaled);
    each conversion is counted as ``converted_<kind>``."""
    if image.mode == "RGB":
        return image
    note(f"converted_{CONVERSION_KINDS.get(image.mode, image.mode.lower())}")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return high_depth_to_rgb(image)
    return image.convert("RGB")


def high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``, ``I``) or float (``F``) grayscale → RGB: ints divided by 257, floats clipped."""
    pixels = np.asarray(image)
    if image.mode == "F":
        gray = np.clip(pixels, 0, 255)
    else:
        gray = pixels.astype(np.float64) / 257.0
    gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to RGB; JPEGs ≥ 2× ``draft_size`` ``(H, W)`` decode at reduced size.

    Raises:
        SkipSample: ``empty_image`` for zero bytes, ``image_too_large`` when the header declares
            more than ``max_pixels`` pixels (``None``: no limit of ours; PIL's own bomb check at
            2× its ``Image.MAX_IMAGE_PIXELS`` still applies), ``bad_image`` when PIL cannot decode.
    """
    if not data:
        raise SkipSample("empty_image", "zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise SkipSample("image_too_large", f"{image.width}×{image.height} > max_pixels={max_pixels}")
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size[1], draft_size[0]))
        image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as exn:
        raise SkipSample("image_too_large", str(exn)) from exn
    except DECODE_ERRORS as exn:
        raise SkipSample("bad_image", repr(exn)) from exn


def crop_box(width: int, height: int, size: tuple[int, int], scale: float) -> tuple[float, float, float, float]:
    """Box ``(left, top, right, bottom)`` with the aspect of ``size`` ``(H, W)`` covering ``scale`` of
    the largest such box; centred when ``scale == 1``, else at a random position."""
    aspect = size[1] / size[0]
    box_w, box_h = (height * aspect, height) if width / height > aspect else (width, width / aspect)
    box_w, box_h = box_w * scale**0.5, box_h * scale**0.5
    left = (width - box_w) * (random.random() if scale < 1 else 0.5)
    top = (height - box_h) * (random.random() if scale < 1 else 0.5)
    return left, top, left + box_w, top + box_h


def to_tensor(image: Image.Image, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """RGB image → ``[3, H, W]`` float tensor ``(pixel / 255 - mean) / std``.

    ``mean``/``std`` may be given as ``[3, 1, 1]`` tensors to avoid rebuilding them per image.
    """
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (pixels - channel_tensor(mean)) / channel_tensor(std)


def channel_tensor(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per-channel values as a ``[3, 1, 1]`` float32 tensor (returned as is when it already is one)."""
    if isinstance(values, torch.Tensor):
        return values
    return torch.tensor(values, dtype=torch.float32)[:, None, None]


def pixel_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → ``[3, H, W]`` uint8 tensor (what an HF torchvision image processor starts from)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``[3, H, W]`` uint8 → ``[3, size[0], size[1]]`` uint8 with torchvision's antialiased ``resize`` (as
    ``TorchvisionBackend.resize``; the same size returns the input)."""
    return tvF.resize(pixels, list(size), interpolation=TORCH_INTERPOLATION[interpolation], antialias=True)


@dataclass(frozen=True)
class Normalize:
    """``[3, H, W]`` uint8 → float32 ``(pixels - 255 mean) / (255 std)``: the rescale by 1/255 fused into the
    normalisation as transformers' ``TorchvisionBackend.rescale_and_normalize`` does (bit-identical to it)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:  # built once, not per image
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32)[:, None, None] * 255.0)
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32)[:, None, None] * 255.0)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) - self._mean) / self._std


def random_crop(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """A crop of ``pixels [3, H, W]`` with the image's own aspect covering ``scale`` of its area, at a random
    position (``scale == 1``: the whole image)."""
    height, width = pixels.shape[-2:]
    crop_h, crop_w = max(1, round(height * scale**0.5)), max(1, round(width * scale**0.5))
    top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
    return pixels[:, top:top + crop_h, left:left + crop_w]


@dataclass(frozen=True)
class ImageTransform:
    """Image bytes → normalised ``[3, H, W]`` tensor.

    ``resize="crop"``: evaluation resizes so the image covers ``size`` and centre-crops; training crops a
    box covering a random ``[min_crop_scale, 1]`` fraction of that area at a random position, then resizes
    (a light random-resized crop; aspect kept, no flips). PIL resampling.

    ``resize="squash"``: evaluation resizes the whole image to ``size`` (aspect not kept) exactly as
    ``transformers.BlipImageProcessor`` (equal ``pixel_values``); training first crops a box with the
    image's own aspect covering a random ``[min_crop_scale, 1]`` fraction of its area, then squashes it the
    same way (no flips).

    Evaluation decodes fully; training decodes large JPEGs in draft mode (see the module docstring).

    Attributes:
        size: ``(H, W)`` output size.
        mean: per-channel mean of ``[0, 1]`` pixels.
        std: per-channel std.
        train: random crop (and draft decoding) instead of the evaluation transform.
        min_crop_scale: smallest area fraction of the training crop (``1.0``: no random crop).
        max_pixels: images with more pixels are skipped as ``image_too_large`` (``None``: no limit).
        resize: ``"crop"`` or ``"squash"`` (see above).
        interpolation: ``"bicubic"`` or ``"bilinear"``.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: bool
    min_crop_scale: float
    max_pixels: int | None = MAX_IMAGE_PIXELS
    resize: str = "crop"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        object.__setattr__(self, "_mean", channel_tensor(self.mean))  # built once, not per image
        object.__setattr__(self, "_std", channel_tensor(self.std))
        object.__setattr__(self, "_normalize", Normalize(self.mean, self.std))

    @classmethod
    def from_preprocess(cls, preprocess: ImagePreprocess, train: bool, min_crop_scale: float = 1.0,
                        max_pixels: int | None = MAX_IMAGE_PIXELS) -> ImageTransform:
        """The transform of an encoder's :class:`~mmlm.encoders.base.ImagePreprocess` (size, mean/std, resize
        mode, interpolation)."""
        return cls(size=tuple(preprocess.size), mean=tuple(preprocess.mean), std=tuple(preprocess.std),
                   train=train, min_crop_scale=min_crop_scale, max_pixels=max_pixels,
                   resize=preprocess.resize, interpolation=preprocess.interpolation)

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode (``SkipSample`` when it fails) and preprocess one image → ``[3, H, W]`` float32."""
        image = decode_image(data, self.size if self.train else None, self.max_pixels)
        scale = random.uniform(self.min_crop_scale, 1.0) if self.train and self.min_crop_scale < 1 else 1.0
        return self.squash(image, scale) if self.resize == "squash" else self.crop(image, scale)

    def crop(self, image: Image.Image, scale: float) -> torch.Tensor:
        """Cover ``size`` and crop (centred at ``scale == 1``, else a random box of ``scale`` of the area)."""
        box = crop_box(image.width, image.height, self.size, scale)
        resized = image.resize((self.size[1], self.size[0]), PIL_RESAMPLING[self.interpolation], box=box)
        return to_tensor(resized, self._mean, self._std)

    def squash(self, image: Image.Image, scale: float) -> torch.Tensor:
        """Resize (a random ``scale`` crop of) the image to exactly ``size``, as ``BlipImageProcessor``."""
        pixels = pixel_tensor(image)
        if scale < 1:
            pixels = random_crop(pixels, scale)
        return self._normalize(resize_pixels(pixels, self.size, self.interpolation))
