"""Vision encoders: pixels ``[B, 3, H, W]`` → tokens ``[B, N, D]`` (see :class:`VisionEncoder`)."""

from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.hf import HFVisionEncoder
from mmlm.encoders.mome import MoMEBlock, MoMEExpert, MoMEOutput, MoMETransformer
from mmlm.encoders.open_clip import OpenClipEncoder
from mmlm.encoders.text import HFTextEncoder, TextEncoder, TransformerTextEncoder
from mmlm.encoders.timm import TimmEncoder

__all__ = [
    "MoMEExpert",
    "HFTextEncoder",
    "HFVisionEncoder",
    "ImagePreprocess",
    "MoMEBlock",
    "MoMEOutput",
    "MoMETransformer",
    "OpenClipEncoder",
    "TextEncoder",
    "TimmEncoder",
    "TransformerTextEncoder",
    "VisionEncoder",
]
