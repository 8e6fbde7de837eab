"""Vision encoders: pixels ``[B, 3, H, W]`` → tokens ``[B, N, D]`` (see :class:`VisionEncoder`)."""

from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.hf import HFVisionEncoder
from mmlm.encoders.open_clip import OpenClipEncoder
from mmlm.encoders.timm import TimmEncoder

__all__ = ["HFVisionEncoder", "ImagePreprocess", "OpenClipEncoder", "TimmEncoder", "VisionEncoder"]
