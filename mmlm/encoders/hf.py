"""Any transformers vision model (ViT, CLIP/SigLIP vision, DonutSwin, Swin, DINOv2, …) as a token encoder.

Shape legend: B batch, N image tokens, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    VisionEncoderDecoderModel,
)
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.common import as_image_size, grad_context, probe_output_shape
from mmlm.freezing import parse_dtype
from mmlm.hub import check_hf_loading_info, config_kwargs

#: Model types whose ``post_layernorm`` normalises ``last_hidden_state`` (CLIP's applies to the pooled output only).
POST_LAYERNORM_OUTPUT = ("blip_2_vision_model", "siglip_vision_model", "siglip2_vision_model")


def getattr_path(module: nn.Module, path: str) -> object | None:
    """``module.a.b`` for ``path = "a.b"``; ``None`` where an attribute is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _from_config(config: PretrainedConfig) -> PreTrainedModel:
    """``AutoModel.from_config``, or the class named after the config (``Blip2VisionConfig`` →
    ``Blip2VisionModel``) for sub-configs that some transformers releases leave out of ``AutoModel``."""
    try:
        return AutoModel.from_config(config)
    except ValueError:
        name = type(config).__name__.removesuffix("Config") + "Model"
        model_class = getattr(transformers, name, None)
        if model_class is None:
            raise
        return model_class(config)


def _build_model(
    name_or_path: str | None, config: dict | None, model_type: str | None, dtype: str | None
) -> PreTrainedModel:
    """From a hub id/local dir (``config`` overrides its attributes, weights loaded strictly) or, without
    one, from scratch with ``AutoConfig.for_model(model_type, **config)``."""
    if name_or_path is None:
        if model_type is None:
            raise ValueError("HFVisionEncoder needs `name_or_path`, or `model_type` (+ `config`) to build from scratch")
        return _from_config(AutoConfig.for_model(model_type, **(config or {})))
    loaded_config = AutoConfig.from_pretrained(name_or_path, **(config or {}))
    loader = VisionEncoderDecoderModel if loaded_config.model_type == "vision-encoder-decoder" else AutoModel
    model, info = loader.from_pretrained(
        name_or_path, config=loaded_config, dtype=parse_dtype(dtype), output_loading_info=True)
    check_hf_loading_info(info, name_or_path, allow_missing=("pooler.*",))
    return model


def _vision_tower(model: PreTrainedModel) -> nn.Module:
    """The image encoder inside a composite model (CLIP/SigLIP/BLIP-2 ``vision_model``, a
    vision-encoder-decoder's ``encoder``, e.g. Donut's DonutSwin); the model itself otherwise."""
    if model.config.model_type == "vision-encoder-decoder":
        return model.encoder
    return getattr(model, "vision_model", model)


def _vision_config(config: PretrainedConfig) -> PretrainedConfig:
    """The vision part of a composite config (``vision_config``/``encoder``), else the config itself."""
    if config.model_type == "vision-encoder-decoder":
        return config.encoder
    return getattr(config, "vision_config", None) or config


def _default_mean_std(model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Class defaults of the image processor registered for ``model_type`` (``clip_vision_model`` → ``clip``)."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or IMAGE_PROCESSOR_MAPPING_NAMES.get(
        model_type.removesuffix("_vision_model"))
    name = (names or {}).get("torchvision") or (names or {}).get("pil")
    cls = get_image_processor_class_from_name(name) if name else None
    if cls is None or getattr(cls, "image_mean", None) is None:
        return None
    return tuple(cls.image_mean), tuple(cls.image_std)


def _mean_std(name_or_path: str | None, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean/std from the checkpoint's image-processor config, else the processor class defaults."""
    if name_or_path is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
            return tuple(processor.image_mean), tuple(processor.image_std)
        except (OSError, ValueError):  # no preprocessor_config.json (or an unknown processor)
            pass
    return _default_mean_std(model_type)


def _preprocess(config: PretrainedConfig, name_or_path: str | None) -> ImagePreprocess:
    """Size from the (vision) config's ``image_size`` (224 if absent); mean/std per :func:`_mean_std`."""
    vision = _vision_config(config)
    size = as_image_size(getattr(vision, "image_size", 224))
    mean_std = _mean_std(name_or_path, vision.model_type)
    return ImagePreprocess(size=size) if mean_std is None else ImagePreprocess(size, *mean_std)


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model: pixels ``[B, 3, H, W]`` → ``last_hidden_state`` (or a hidden state)
    ``[B, N, D]``.

    Composite checkpoints are reduced to their image encoder (CLIP/SigLIP ``vision_model``, a Donut
    ``VisionEncoderDecoderModel``'s DonutSwin ``encoder``); a parameterised pooler is dropped.

    Args:
        name_or_path: hub id or local ``save_pretrained`` directory. Weights load strictly
            (missing, unexpected or mismatched keys raise; a missing pooler is allowed).
        config: without ``name_or_path``, the config of a from-scratch model (with ``model_type``);
            with it, attribute overrides for ``from_pretrained``.
        model_type: transformers model type for a from-scratch model (``"vit"``, ``"donut-swin"``,
            ``"clip_vision_model"``, …).
        layer: ``-1`` ``last_hidden_state`` (after the final norm where the model has one), otherwise
            ``hidden_states[layer]`` (``-2`` the penultimate layer's/stage's output).
        freeze: no grads, eval mode kept, forward under ``no_grad`` (unless ``trainable_blocks``).
        trainable_blocks: with ``freeze``, the last this many of the layers up to ``layer`` (``encoder.layer`` or
            ``encoder.layers``) still train, in train mode, and so does a final ``layernorm`` (ViT, DINOv2) with
            ``layer=-1``; 0: none. Staged models (Swin, DonutSwin) refuse it.
        grad_checkpointing: enable transformers' gradient checkpointing.
        dtype: parameter dtype (``"bfloat16"``, ``"fp16"``, …); inputs are cast to it.
        preprocess: the image preprocessing (``ImagePreprocess`` fields: ``size``, ``mean``, ``std``, ``resize``,
            ``interpolation``) instead of the one read from the config and the checkpoint's image processor.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict | None = None,
        model_type: str | None = None,
        layer: int = -1,
        freeze: bool = False,
        trainable_blocks: int = 0,
        grad_checkpointing: bool = False,
        dtype: str | None = None,
        preprocess: dict | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        model = _build_model(name_or_path, config, model_type, dtype)
        if grad_checkpointing:  # renamed in transformers 5.x; the old name warns
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        self.preprocess = _preprocess(model.config, name_or_path) if preprocess is None else ImagePreprocess(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()})
        self.source = name_or_path
        self.model = _vision_tower(model)
        if any(p.requires_grad for p in getattr(self.model, "pooler", nn.Identity()).parameters()):
            self.model.pooler = None  # unused, would only trip DDP's unused-parameter check
        self.num_tokens, self.width = probe_output_shape(self, self.preprocess.size)
        self.keep_blocks_trainable(trainable_blocks, freeze, *self._blocks())
        self.setup_freezing(freeze, dtype)
        for param in self.unused_parameters():
            param.requires_grad_(False)

    def offline_args(self) -> dict[str, Any]:
        """The tower rebuilt from its own config, with its preprocessing (which may have come from the source's
        image processor) spelled out."""
        return {"name_or_path": None, "config": config_kwargs(self.model.config, with_type=False),
                "model_type": self.model.config.model_type, "preprocess": dataclasses.asdict(self.preprocess)}

    def _blocks(self) -> tuple[list[nn.Module] | None, nn.Module | None]:
        """The transformer layers whose output ``layer`` reads (``encoder.layer``/``encoder.layers``/``layers``, up
        to ``layer``) and, for ``layer=-1``, the final norm ``last_hidden_state`` goes through (``layernorm``, or
        ``post_layernorm`` of :data:`POST_LAYERNORM_OUTPUT` models; CLIP's pools before it); ``(None, None)`` for
        staged models (Swin) or models without such a list."""
        layers = next((found for path in ("encoder.layer", "encoder.layers", "layers", "layer")
                       if isinstance(found := getattr_path(self.model, path), nn.ModuleList)), None)
        if layers is None or hasattr(self.model.config, "depths"):
            return None, None
        if self.layer == -1:
            post = self.model.config.model_type in POST_LAYERNORM_OUTPUT
            return list(layers), getattr(self.model, "layernorm", None) or (
                getattr(self.model, "post_layernorm", None) if post else None)
        end = self.layer if self.layer >= 0 else len(layers) + 1 + self.layer  # hidden_states[k]: after layer k - 1
        return list(layers)[:end], None

    def unused_parameters(self) -> list[nn.Parameter]:
        """For ``layer`` other than ``-1``: the blocks after it and the final norm (``layernorm``, ``post_layernorm``)
        that ``hidden_states[layer]`` never goes through."""
        if self.layer == -1:
            return []
        used, _ = self._blocks()
        layers = next((found for path in ("encoder.layer", "encoder.layers", "layers", "layer")
                       if isinstance(found := getattr_path(self.model, path), nn.ModuleList)), None)
        if used is None or layers is None:
            return []
        after = [module for module in layers if not any(module is kept for kept in used)]
        norms = [getattr(self.model, name) for name in ("layernorm", "post_layernorm")
                 if isinstance(getattr(self.model, name, None), nn.Module)]
        return [param for module in after + norms for param in module.parameters()]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → ``tokens [B, N, D]``."""
        with grad_context(self.no_grad_forward):
            out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=self.layer != -1)
            return out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
