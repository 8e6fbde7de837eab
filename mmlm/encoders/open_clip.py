"""The image tower of an open_clip model (CLIP, SigLIP, EVA, timm- or ResNet-based) as a token encoder.

Shape legend: B batch, N image tokens, D width.
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict as open_clip_load_state_dict
from open_clip.model import _build_vision_tower
from open_clip.timm_model import TimmModel
from open_clip.utils import feature_take_indices
from torch import nn

from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.common import as_image_size, grad_context, map_to_tokens, probe_output_shape
from mmlm.hub import load_state_dict_strict

_VISUAL = "visual."


def _build_named(name: str, pretrained: str | None, img_size: int | None) -> tuple[nn.Module, dict]:
    """open_clip's ``create_model`` (it loads a tag or a local file strictly) → (visual tower, preprocess cfg)."""
    model = open_clip.create_model(name, pretrained=pretrained, force_image_size=img_size, pretrained_text=False)
    return model.visual, open_clip.get_model_preprocess_cfg(model)


def _build_from_config(config: dict, img_size: int | None) -> tuple[nn.Module, dict]:
    """A model config dict (``embed_dim``, ``vision_cfg``, optional ``quick_gelu``/``preprocess_cfg``; any
    ``text_cfg`` is ignored) → (visual tower only, preprocess cfg)."""
    vision_cfg = copy.deepcopy(config["vision_cfg"])
    if img_size is not None:
        vision_cfg["image_size"] = img_size
    visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
    preprocess = {"size": visual.image_size, **config.get("preprocess_cfg", {})}
    return visual, preprocess


def _match_timm_size(visual: nn.Module) -> None:
    """timm-based towers build the trunk at timm's default size and ignore the config's image size."""
    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "set_input_size"):
        visual.set_input_size(visual.image_size)


def load_visual_weights(visual: nn.Module, path: str) -> None:
    """Strictly load the ``visual.*`` keys of an open_clip checkpoint (or a tower-only state dict).

    Other towers' keys (``transformer.*``, ``logit_scale``, …) are ignored; a missing or unexpected
    visual key raises a ``RuntimeError`` naming it.
    """
    state = open_clip_load_state_dict(path)
    if any(k.startswith(_VISUAL) for k in state):
        state = {k[len(_VISUAL):]: v for k, v in state.items() if k.startswith(_VISUAL)}
    load_state_dict_strict(visual, state, path)


def _preprocess(cfg: dict) -> ImagePreprocess:
    """open_clip's preprocess cfg (``size``/``mean``/``std``) → :class:`ImagePreprocess`."""
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return ImagePreprocess(size=as_image_size(cfg["size"]), mean=tuple(mean), std=tuple(std))


class OpenClipEncoder(VisionEncoder):
    """An open_clip image tower: pixels ``[B, 3, H, W]`` → tokens ``[B, N, D]`` (not the pooled vector).

    ViT towers give ``N = 1 + (H/p)·(W/p)`` tokens (the class token first when ``prefix_tokens``),
    ResNet towers the last feature map flattened. ``D`` is the tower's width, before any projection.

    Args:
        name: a built-in open_clip model name (``ViT-B-32``) or an ``hf-hub:``/``local-dir:`` id.
        config: instead of ``name``, a model config dict as in open_clip's ``model_configs/*.json``
            (``embed_dim``, ``vision_cfg``; ``text_cfg`` is not built). Tiny ones suit tests.
        pretrained: with ``name``, an open_clip tag (needs network) or a local checkpoint file; with
            ``config``, a local checkpoint file. Loading is strict.
        img_size: input size override (``None`` keeps the config's).
        layer: ``-1`` the last block's tokens after the final norm (``ln_post``), ``-2`` the
            penultimate block's (no final norm), …
        prefix_tokens: keep the class token in front of the patch tokens (ViT towers).
        freeze: no grads, eval mode kept, forward under ``no_grad`` (unless ``trainable_blocks``).
        trainable_blocks: with ``freeze``, the last this many blocks kept (those up to ``layer``) still train, in
            train mode, and so does the final norm when the output goes through it (``layer=-1``); 0: none.
        grad_checkpointing: enable the tower's activation checkpointing.
        dtype: parameter dtype (``"bfloat16"``, ``"fp16"``, …); inputs are cast to it.
    """

    def __init__(
        self,
        name: str | None = None,
        config: dict | None = None,
        pretrained: str | None = None,
        img_size: int | None = None,
        layer: int = -1,
        prefix_tokens: bool = True,
        freeze: bool = False,
        trainable_blocks: int = 0,
        grad_checkpointing: bool = False,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if (name is None) == (config is None):
            raise ValueError("OpenClipEncoder needs exactly one of `name` or `config`")
        self.layer = layer
        if name is not None:
            self.visual, cfg = _build_named(name, pretrained, img_size)
        else:
            self.visual, cfg = _build_from_config(config, img_size)
            if pretrained is not None:
                load_visual_weights(self.visual, pretrained)
        _match_timm_size(self.visual)
        self.source = None if pretrained is None else f"open_clip:{name}:{pretrained}" if name else pretrained
        self._take = self._prune(layer)
        self._with_prefix = prefix_tokens and self._has_prefix()
        self.visual.set_grad_checkpointing(grad_checkpointing)
        self.preprocess = _preprocess(cfg)
        self.num_tokens, self.width = probe_output_shape(self, self.preprocess.size)
        self.keep_blocks_trainable(trainable_blocks, freeze, *self._blocks())
        self.setup_freezing(freeze, dtype)

    def offline_args(self) -> dict[str, Any]:
        """The same tower without pretrained weights."""
        return {"pretrained": None}

    def _prune(self, layer: int) -> list[int]:
        """Drop the pooling/projection head (and blocks after ``layer``) where the tower allows.

        Returns the absolute block indices to take (unused parameters would also trip DDP).
        """
        visual = self.visual
        if isinstance(visual, TimmModel):
            visual.head = nn.Identity()
            return visual.trunk.prune_intermediate_layers([layer], prune_norm=layer != -1, prune_head=True)
        if hasattr(visual, "prune_intermediate_layers"):
            return visual.prune_intermediate_layers([layer], prune_norm=layer != -1, prune_head=True)
        take, last = feature_take_indices(5, [layer])  # ModifiedResNet: stem, layer1..layer4
        for stage in range(last + 1, 5):
            setattr(visual, f"layer{stage}", nn.Identity())
        visual.attnpool = nn.Identity()
        return take

    def _blocks(self) -> tuple[nn.Sequential | nn.ModuleList | None, nn.Module | None]:
        """The tower's blocks kept up to ``layer`` (ViT ``transformer.resblocks``, a timm trunk's ``blocks``) and its
        final norm (``ln_post``/``norm``, an ``Identity`` once pruned for ``layer != -1``); ``(None, None)`` for
        ResNet towers."""
        if isinstance(self.visual, TimmModel):
            trunk = self.visual.trunk
            return getattr(trunk, "blocks", None), getattr(trunk, "norm", None)
        transformer = getattr(self.visual, "transformer", None)
        if transformer is None:
            return None, None
        return transformer.resblocks, getattr(self.visual, "ln_post", None)

    def _has_prefix(self) -> bool:
        """Whether the tower puts prefix (class/register) tokens before the patch tokens."""
        if isinstance(self.visual, TimmModel):
            return getattr(self.visual.trunk, "num_prefix_tokens", 0) > 0
        return hasattr(self.visual, "class_embedding")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → ``tokens [B, N, D]``."""
        with grad_context(self.no_grad_forward):
            out = self.visual.forward_intermediates(
                pixels.to(self.dtype), indices=self._take, stop_early=True, intermediates_only=True,
                normalize_intermediates=self.layer == -1, output_extra_tokens=self._with_prefix)
            tokens = map_to_tokens(out["image_intermediates"][0])
            if self._with_prefix:
                tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
            return tokens
