"""Any timm image model as a token encoder: ViTs (incl. DINO, registers), Swin, CNNs, NF-ResNets.

Shape legend: B batch, N image tokens, D width, C channels, h/w feature-map height/width.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.common import as_image_size, grad_context, map_to_tokens, probe_output_shape, sincos_2d
from mmlm.hub import load_state_dict_strict


def _classifier_patterns(model: nn.Module) -> tuple[str, ...]:
    """Key patterns of the classifier head(s) named in the model's ``pretrained_cfg``."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}.*" for name in names)


def load_timm_weights(model: nn.Module, path: str) -> None:
    """Load a local ``.safetensors``/``.pt``/``.pth`` state dict into ``model`` strictly.

    Classifier-head keys in the file are dropped (the encoder has no head); any other missing or
    unexpected key raises a ``RuntimeError`` that names them.
    """
    state = timm_load_state_dict(path, use_ema=False)
    load_state_dict_strict(model, state, path, allow_unexpected=_classifier_patterns(model))


class TimmEncoder(VisionEncoder):
    """A ``timm`` model by name: pixels ``[B, 3, H, W]`` → tokens ``[B, N, D]``.

    ViT-like models give ``N = prefix + (H/p)·(W/p)`` tokens (prefix = cls/register tokens when
    ``prefix_tokens``); CNNs give the feature map flattened to ``N = h·w`` tokens of ``D = C`` channels, which carry
    no explicit position unless ``sincos_positions``.

    Args:
        name: any ``timm.create_model`` name, with an optional tag (``vit_small_patch16_224.dino``).
        pretrained: ``True`` for timm's hub weights (needs network), or a local state-dict file
            (``.safetensors``/``.pt``/``.pth``) loaded strictly, classifier head ignored.
        img_size: input size, ``S`` or ``(H, W)``; passed to ``create_model`` for fixed-size models (ViTs),
            otherwise only sets ``preprocess.size``. ``None`` keeps the model's default.
        layer: which block's output: ``-1`` the final features (after the final norm), ``-2`` the
            penultimate block/stage (no final norm), … Unused later blocks are pruned.
        prefix_tokens: keep cls/register tokens in front of the patch tokens (ViT-like models).
        model_kwargs: extra ``timm.create_model`` keyword arguments (e.g. a tiny ``embed_dim``/``depth``).
        freeze: no grads, eval mode kept, forward under ``no_grad`` (unless ``trainable_blocks``).
        trainable_blocks: with ``freeze``, the last this many of timm's ``blocks`` kept (those up to ``layer``) still
            train, in train mode, and so does the final ``norm`` when the output goes through it (``layer=-1``);
            0: none. Models without a ``blocks`` list (Swin's ``layers``, ResNets' stages) refuse it.
        grad_checkpointing: enable timm's activation checkpointing.
        dtype: parameter dtype (``"bfloat16"``, ``"fp16"``, …); inputs are cast to it.
        sincos_positions: add fixed 2D sin-cos positions (:func:`~mmlm.encoders.common.sincos_2d`, no parameters)
            to a CNN's feature map before it is flattened, so a decoder that cross-attends to the tokens can tell
            where each one lies (the tiny Donut recipe reads receipts with it: docs/donut.md). Models that give
            tokens (ViTs, with their own position embeddings) refuse it.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        img_size: int | tuple[int, int] | None = None,
        layer: int = -1,
        prefix_tokens: bool = True,
        model_kwargs: dict | None = None,
        freeze: bool = False,
        trainable_blocks: int = 0,
        grad_checkpointing: bool = False,
        dtype: str | None = None,
        sincos_positions: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.prefix_tokens = prefix_tokens
        self.sincos_positions = False  # set below, once the probe shows a feature map
        kwargs = dict(model_kwargs or {})
        if img_size is not None and _fixed_input_size(name):
            kwargs["img_size"] = img_size
        self.model = timm.create_model(name, pretrained=pretrained is True, num_classes=0, **kwargs)
        if isinstance(pretrained, str):
            load_timm_weights(self.model, pretrained)
        self.source = pretrained if isinstance(pretrained, str) else f"timm:{name}" if pretrained else None
        self._take = self._prune(layer)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.preprocess = self._preprocess(img_size or kwargs.get("img_size"))
        self.num_tokens, self.width = probe_output_shape(self, self.preprocess.size)
        if sincos_positions:
            self._check_feature_map(name)
            self.sincos_positions = True
        blocks = getattr(self.model, "blocks", None)
        blocks = blocks if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else None
        self.keep_blocks_trainable(trainable_blocks, freeze, blocks, getattr(self.model, "norm", None))
        self.setup_freezing(freeze, dtype)

    def offline_args(self) -> dict[str, Any]:
        """The same timm architecture without pretrained weights."""
        return {"pretrained": False}

    def _prune(self, layer: int) -> list[int] | None:
        """Drop the head (and blocks after ``layer``); → timm's absolute index of ``layer``."""
        if not hasattr(self.model, "prune_intermediate_layers"):
            if layer != -1:
                raise ValueError(f"timm model {type(self.model).__name__} has no intermediate layers; use layer=-1")
            return None
        try:
            return self.model.prune_intermediate_layers([layer], prune_norm=layer != -1, prune_head=True)
        except AssertionError as err:  # timm asserts the index range
            raise ValueError(f"layer={layer} does not exist in timm model {type(self.model).__name__}: {err}") from err

    def _preprocess(self, img_size: int | None) -> ImagePreprocess:
        """Size/mean/std from timm's resolved data config; an explicit ``img_size`` wins."""
        cfg = resolve_model_data_config(self.model)
        size = as_image_size(img_size if img_size is not None else cfg["input_size"])
        return ImagePreprocess(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))

    def _check_feature_map(self, name: str) -> None:
        """Refuse ``sincos_positions`` for a model whose output is not a feature map, or an odd width."""
        with torch.no_grad():
            out = self.model.forward_features(torch.zeros(1, 3, *self.preprocess.size))
        if out.ndim != 4:
            raise ValueError(f"TimmEncoder({name!r}): sincos_positions is for CNN feature maps; this model gives "
                             f"tokens {tuple(out.shape)} (with its own position embeddings)")
        if self.width % 4:
            raise ValueError(f"TimmEncoder({name!r}): sincos_positions needs a width divisible by 4, got {self.width}")

    def _tokens(self, x: torch.Tensor, fmt: str = "NCHW") -> torch.Tensor:
        """A feature map → ``[B, h·w, C]`` tokens, plus 2D sin-cos positions when ``sincos_positions``."""
        tokens = map_to_tokens(x, fmt)
        if self.sincos_positions:
            height, width = (x.shape[1], x.shape[2]) if fmt == "NHWC" else (x.shape[2], x.shape[3])
            tokens = tokens + sincos_2d(height, width, tokens.shape[-1], tokens.dtype, tokens.device)
        return tokens

    def _final_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``forward_features`` → ``[B, N, D]``, without prefix tokens unless ``prefix_tokens``."""
        x = self.model.forward_features(pixels)
        if x.ndim == 4:
            return self._tokens(x, getattr(self.model, "output_fmt", "NCHW"))
        return x if self.prefix_tokens else x[:, getattr(self.model, "num_prefix_tokens", 0):]

    def _intermediate(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output of block ``layer`` (no final norm) → ``[B, N, D]``."""
        with_prefix = self.prefix_tokens and getattr(self.model, "num_prefix_tokens", 0) > 0
        extra = {"return_prefix_tokens": True} if with_prefix else {}
        (out,) = self.model.forward_intermediates(
            pixels, indices=self._take, intermediates_only=True, stop_early=True, **extra)
        if with_prefix:
            spatial, prefix = out
            return torch.cat([prefix, map_to_tokens(spatial)], dim=1)
        return self._tokens(out)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → ``tokens [B, N, D]``."""
        pixels = pixels.to(self.dtype)
        with grad_context(self.no_grad_forward):
            return self._final_features(pixels) if self.layer == -1 else self._intermediate(pixels)


def _fixed_input_size(name: str) -> bool:
    """Whether timm builds ``name`` for one input size (ViT-like), i.e. takes an ``img_size`` argument."""
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return bool(getattr(cfg, "fixed_input_size", False))
