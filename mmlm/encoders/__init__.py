"""Vision and text encoders: pixels ``[B, 3, H, W]`` → tokens ``[B, N, D]`` (see :class:`VisionEncoder`), text ids →
``[B, T, D]``, and VLMO's MoME transformer (both at once). Every class is exported here and imported from its module
on first use (:mod:`mmlm.lazy`)."""

from __future__ import annotations

from mmlm.lazy import lazy_exports

#: Exported name → the module that defines it.
_EXPORTS: dict[str, str] = {
    "HFTextEncoder": "mmlm.encoders.text",
    "HFVisionEncoder": "mmlm.encoders.hf",
    "ImagePreprocess": "mmlm.encoders.base",
    "MoMEBlock": "mmlm.encoders.mome",
    "MoMEBranches": "mmlm.encoders.mome",
    "MoMEConfig": "mmlm.encoders.mome",
    "MoMEExpert": "mmlm.encoders.mome",
    "MoMEOutput": "mmlm.encoders.mome",
    "MoMETransformer": "mmlm.encoders.mome",
    "MultiwayRelPosBias": "mmlm.encoders.mome",
    "OpenClipEncoder": "mmlm.encoders.open_clip",
    "TextEncoder": "mmlm.encoders.text",
    "TimmEncoder": "mmlm.encoders.timm",
    "TransformerTextEncoder": "mmlm.encoders.text",
    "VisionEncoder": "mmlm.encoders.base",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
