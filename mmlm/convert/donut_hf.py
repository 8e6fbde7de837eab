"""Strict import/export of transformers' Donut checkpoints (``VisionEncoderDecoderModel`` + ``DonutProcessor``,
the layout of ``naver-clova-ix/donut-base``).

The checkpoint's state dict splits by prefix, each part loaded strictly into its part of :class:`mmlm.models.Donut`:

======================  ==========================================================================
``encoder.*``           ``encoder.model`` (an :class:`HFVisionEncoder` over ``DonutSwinModel``)
``decoder.*``           ``decoder.model`` (a :class:`CrossAttentionLM` over ``MBartForCausalLM``)
``enc_to_dec_proj.*``   ``enc_to_dec_proj`` (only when the encoder and decoder widths differ)
======================  ==========================================================================

Any other key, or one a part does not take, raises a ``RuntimeError`` naming it (only ``lm_head`` ↔ embedding
ties may be absent). The image size, mean/std, ``resample`` (the interpolation of both resizes) and
``do_align_long_axis`` come from the checkpoint's image processor; export writes them back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoImageProcessor,
    DonutImageProcessor,
    DonutProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from mmlm.convert.keys import assign_part, empty_weights, load_part, read_checkpoint, split_by_prefix
from mmlm.convert.language_part import language_part
from mmlm.encoders.base import INTERPOLATIONS, ImagePreprocess, interpolation_of
from mmlm.encoders.hf import HFVisionEncoder
from mmlm.language.cross_attention import CrossAttentionLM
from mmlm.lora import LoRA, merge_lora_

if TYPE_CHECKING:
    from mmlm.models.donut import Donut

PARTS = ("encoder.", "decoder.", "enc_to_dec_proj.")
CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "model_type")


def split_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Full checkpoint → ``{"encoder.": …, "decoder.": …, "enc_to_dec_proj.": …}`` with the prefixes stripped."""
    return split_by_prefix(state, PARTS, source)


def config_dict(config: Any) -> dict[str, Any]:
    """A sub-config as plain keyword arguments (no model type, architectures or version)."""
    return {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOISE}


def read_processor(directory: Path, encoder: HFVisionEncoder) -> tuple[ImagePreprocess, bool]:
    """``(preprocess, align_long_axis)`` from the checkpoint's Donut image processor (size, mean/std,
    ``resample`` as the interpolation); without one, the encoder's own (config size, Donut's class mean/std)
    with ``DonutImageProcessor``'s default resample (bilinear) and no alignment."""
    try:
        processor = AutoImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError):  # no preprocessor_config.json
        return replace(encoder.preprocess, interpolation=interpolation_of(DonutImageProcessor.resample)), False
    size = (processor.size["height"], processor.size["width"])
    preprocess = ImagePreprocess(size, tuple(processor.image_mean), tuple(processor.image_std),
                                 interpolation=interpolation_of(processor.resample))
    return preprocess, bool(getattr(processor, "do_align_long_axis", False))


def build_encoder(config: Any, image_size: tuple[int, int] | None, grad_checkpointing: bool) -> HFVisionEncoder:
    """A randomly initialised encoder of the checkpoint's vision config (``image_size`` overrides its size)."""
    kwargs = config_dict(config)
    if image_size is not None:
        kwargs["image_size"] = list(image_size)
    return HFVisionEncoder(config=kwargs, model_type=config.model_type, grad_checkpointing=grad_checkpointing)


def donut_from_hf(cls: type[Donut], name_or_path: str, tokenizer: str | None = None,
                  image_size: tuple[int, int] | None = None, grad_checkpointing: bool = False,
                  attn_implementation: str | None = None, quantization: str | None = None, lora: LoRA | None = None,
                  **kwargs: Any) -> Donut:
    """Build ``cls`` (:class:`mmlm.models.Donut`) from a ``VisionEncoderDecoderModel`` checkpoint, strictly.

    Args:
        name_or_path: ``save_pretrained`` directory or hub id (downloaded when online).
        tokenizer: tokenizer directory/hub id; default the checkpoint's own.
        image_size: ``(H, W)`` input size instead of the checkpoint's (e.g. ``(1280, 960)``); Swin's windowed
            attention has no absolute positions, so the weights serve any size.
        grad_checkpointing: recompute activations of encoder and decoder in the backward pass.
        attn_implementation, quantization, lora: the decoder adapter's options
            (:class:`~mmlm.language.hf_base.HFLanguageModel`); with ``lora`` (or ``quantization``) the decoder's
            base weights are frozen and only its adapters train.
        **kwargs: further :class:`Donut` arguments (optimisation, generation).
    """
    directory, state = read_checkpoint(name_or_path)
    config = VisionEncoderDecoderConfig.from_pretrained(str(directory))
    parts = split_state_dict(state, name_or_path)
    with empty_weights():  # no random encoder first: the checkpoint's tensors become its weights
        encoder = build_encoder(config.encoder, image_size, grad_checkpointing)
    assign_part(encoder.model, parts["encoder."], f"{name_or_path} encoder.*")
    preprocess, align = read_processor(directory, encoder)
    encoder.preprocess = preprocess if image_size is None else replace(preprocess, size=tuple(image_size))
    decoder = language_part(CrossAttentionLM, {"model_type": config.decoder.model_type, **config_dict(config.decoder)},
                            parts["decoder."], f"{name_or_path} decoder.*", freeze=False,
                            grad_checkpointing=grad_checkpointing, attn_implementation=attn_implementation,
                            quantization=quantization, lora=lora)
    encoder.source = decoder.source = name_or_path  # their weights are re-read from the checkpoint
    model = cls(encoder=encoder, decoder=decoder, tokenizer=tokenizer or str(directory), align_long_axis=align,
                **kwargs)
    projection = model.enc_to_dec_proj if model.enc_to_dec_proj is not None else torch.nn.Module()
    load_part(projection, parts["enc_to_dec_proj."], f"{name_or_path} enc_to_dec_proj.*")
    return model


def hf_exportable(model: Donut) -> bool:
    """Whether every part has a place in ``VisionEncoderDecoderModel`` (:func:`_check_exportable` passes)."""
    try:
        _check_exportable(model)
    except TypeError:
        return False
    return True


def _check_exportable(model: Donut) -> None:
    """Raise ``TypeError`` when a part has no place in ``VisionEncoderDecoderModel``."""
    if not (isinstance(model.encoder, HFVisionEncoder) and model.encoder.layer == -1):
        raise TypeError(f"to_hf needs encoder = HFVisionEncoder (layer -1), got {type(model.encoder).__name__}")
    if not isinstance(model.decoder, CrossAttentionLM):
        raise TypeError(f"to_hf needs decoder = CrossAttentionLM, got {type(model.decoder).__name__}")


def donut_state_to_hf(model: Donut, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our module's weights (or ``state_dict``, the module's own keys, as gathered from FSDP2 shards) under
    ``VisionEncoderDecoderModel`` keys.

    Raises:
        ValueError: ``state_dict`` with LoRA adapters on the decoder (they are merged from the module).
    """
    if state_dict is not None:
        if model.decoder.lora is not None:
            raise ValueError("Donut export: LoRA adapters are merged from the module, not from a gathered state dict; "
                             "export the checkpoint with `mmlm export` instead")
        renamed = {"encoder.model.": "encoder.", "decoder.model.": "decoder.", "enc_to_dec_proj.": "enc_to_dec_proj."}
        return {new + key.removeprefix(old): value.detach() for key, value in state_dict.items()
                for old, new in renamed.items() if key.startswith(old)}
    state = {f"encoder.{k}": v for k, v in model.encoder.model.state_dict().items()}
    decoder = model.decoder.model
    decoder = merge_lora_(copy.deepcopy(decoder)) if model.decoder.lora is not None else decoder  # LoRA merged in
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    if model.enc_to_dec_proj is not None:
        state |= {f"enc_to_dec_proj.{k}": v for k, v in model.enc_to_dec_proj.state_dict().items()}
    return {k: v.detach() for k, v in state.items()}


def hf_config(model: Donut) -> VisionEncoderDecoderConfig:
    """The ``VisionEncoderDecoderConfig`` of ``model`` with the tokenizer's special ids and input size."""
    encoder = model.encoder.model.config.to_dict() | {"image_size": list(model.image_preprocess.size)}
    config = VisionEncoderDecoderConfig(encoder=encoder, decoder=model.decoder.model.config.to_dict())
    tokenizer = model.tokenizer
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.decoder_start_token_id = tokenizer.bos_token_id
    return config


def donut_to_hf(model: Donut, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``directory`` so ``VisionEncoderDecoderModel.from_pretrained`` and ``DonutProcessor.from_pretrained``
    load it: config, safetensors weights (``state_dict``'s when given: see :func:`donut_state_to_hf`), tokenizer
    (with the added task/field tokens) and image processor."""
    _check_exportable(model)
    with torch.device("meta"):
        hf = VisionEncoderDecoderModel(hf_config(model))
    load_part(hf, donut_state_to_hf(model, state_dict), "Donut export", assign=True)
    hf.tie_weights()
    hf.save_pretrained(str(directory))
    pre = model.image_preprocess
    images = DonutImageProcessor(size={"height": pre.size[0], "width": pre.size[1]}, image_mean=list(pre.mean),
                                 image_std=list(pre.std), do_align_long_axis=model.align_long_axis,
                                 resample=INTERPOLATIONS[pre.interpolation])
    DonutProcessor(image_processor=images, tokenizer=model.tokenizer).save_pretrained(str(directory))
