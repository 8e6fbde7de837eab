"""timm ViT → MoME transformer (VLMO's image path): a strict key map.

Every key of a timm ``VisionTransformer`` state dict (class token, no registers, no layer scale) has one place
in :class:`mmlm.encoders.mome.MoMETransformer`: attention, patch embedding, positions and final norm keep their
names, each block's ``norm2``/``mlp`` become the vision expert ``experts.v.norm``/``experts.v.mlp``. Only the
classifier (``head.*``, ``fc_norm.*``) is dropped. MoME keys that a ViT cannot provide (text embeddings, L/VL
experts, the mask token, layer scales, the relative position table, modality-type embeddings) are the only ones
allowed to stay as initialised; anything else raises.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmlm.encoders.mome import MoMETransformer
from mmlm.hub import check_keys, looks_local

#: timm keys with no place in MoME (the ImageNet classifier).
DROPPED_TIMM_KEYS = ("head.*", "fc_norm.*")
#: MoME keys a timm ViT cannot provide (text side, L/VL experts, mask token, and unilm VLMO's layer scales,
#: relative position table and modality-type embeddings, which keep their initial values).
NEW_MOME_KEYS = ("word_embed.*", "text_pos_embed", "mask_token", "blocks.*.experts.l.*", "blocks.*.experts.vl.*",
                 "blocks.*.ls1.*", "blocks.*.ls2.*", "rel_pos_bias.*", "token_type_embed.*")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_RENAMES = ((re.compile(r"^blocks\.(\d+)\.norm2\."), r"blocks.\1.experts.v.norm."),
            (re.compile(r"^blocks\.(\d+)\.mlp\."), r"blocks.\1.experts.v.mlp."))
_KEPT = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
                   r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj)\.(weight|bias))$")


def timm_key_to_mome(key: str) -> str | None:
    """The MoME name of one timm ViT key; ``None`` for a dropped key (classifier).

    Raises:
        KeyError: the key is neither mapped nor dropped (layer scale, registers, … — not a plain ViT).
    """
    if any(re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), key) for pattern in DROPPED_TIMM_KEYS):
        return None
    for pattern, target in _RENAMES:
        if pattern.match(key):
            return pattern.sub(target, key)
    if _KEPT.match(key):
        return key
    raise KeyError(f"timm key {key!r} has no place in the MoME transformer (expected a plain class-token ViT)")


def timm_to_mome(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict → MoME keys (classifier dropped); raises ``KeyError`` on an unknown key."""
    mapped = {timm_key_to_mome(k): v for k, v in state_dict.items()}
    return {k: v for k, v in mapped.items() if k is not None}


def load_timm_state(name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """A timm ViT state dict from a local file (``.safetensors``/``.pt``/``.pth``) or a timm model name
    (``vit_base_patch16_224.augreg_in21k``; downloads its pretrained weights)."""
    if looks_local(str(name_or_path)) or Path(name_or_path).suffix in CHECKPOINT_SUFFIXES:
        from timm.models import load_state_dict

        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"timm ViT checkpoint {name_or_path} does not exist")
        return load_state_dict(str(name_or_path), use_ema=False)
    import timm

    return timm.create_model(str(name_or_path), pretrained=True).state_dict()


def load_timm_into_mome(transformer: MoMETransformer, name_or_path: str | Path | dict[str, torch.Tensor]) -> None:
    """Initialise attention, patch/position embeddings, class token, final norm and V-FFNs from a timm ViT.

    Shapes must match (same width, depth, heads, patch and image size). Only :data:`NEW_MOME_KEYS` may be
    missing from the checkpoint and only :data:`DROPPED_TIMM_KEYS` are ignored; anything else raises.
    """
    source = "state dict" if isinstance(name_or_path, dict) else str(name_or_path)
    state = timm_to_mome(name_or_path if isinstance(name_or_path, dict) else load_timm_state(name_or_path))
    result = transformer.load_state_dict(state, strict=False)
    check_keys(result.missing_keys, result.unexpected_keys, source, allow_missing=NEW_MOME_KEYS)
