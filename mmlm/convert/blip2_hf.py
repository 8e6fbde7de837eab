"""Strict import/export of whole ``transformers.Blip2ForConditionalGeneration`` checkpoints.

A checkpoint's state dict splits by prefix into four parts, each loaded strictly into its own part of
:class:`mmlm.models.Blip2`:

============================  =============================================================
``vision_model.*``            ``encoder.model`` (an :class:`HFVisionEncoder` over ``Blip2VisionModel``)
``query_tokens``, ``qformer.*``  ``qformer`` (key map of :mod:`mmlm.convert.blip2`)
``language_projection.*``     ``language_projection``
``language_model.*``          ``language_model.model`` (``HFCausalLM`` or ``HFSeq2SeqLM``)
============================  =============================================================

``vision_model.post_layernorm`` is LAVIS's ``ln_vision`` (transformers' BLIP-2 conversion renames it so): it is
copied into the Q-Former's trainable ``vision_norm``, and the encoder returns the last layer's tokens before it
(``layer = num_hidden_layers``); export writes ``vision_norm`` back as ``post_layernorm``.

A key outside these prefixes, or one a part does not take, raises a ``RuntimeError`` naming it; only
weights tied to a loaded weight (``lm_head`` ↔ input embeddings) may be absent from the file.

The token that ends text is the checkpoint's generation eos (``generation_config.json``, else the text config's): for
Salesforce's OPT checkpoints ``"\\n"`` (id 50118, as LAVIS's ``blip2_opt.py`` trains and generates), not the
tokenizer's ``</s>``. Import makes it the model's ``end_token_id``; export writes it back as the generation eos.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModel,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    BlipImageProcessor,
)
from transformers import GenerationConfig as HFGenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME

from mmlm.convert.blip2 import qformer_from_hf, qformer_kwargs_from_hf, qformer_to_hf
from mmlm.convert.keys import load_part, read_checkpoint, split_by_prefix
from mmlm.convert.language_part import language_part
from mmlm.encoders.base import INTERPOLATIONS, ImagePreprocess, interpolation_of
from mmlm.encoders.hf import HFVisionEncoder
from mmlm.language.hf_base import HFLanguageModel
from mmlm.language.hf_causal import HFCausalLM
from mmlm.language.hf_seq2seq import HFSeq2SeqLM
from mmlm.lora import LoRA, merge_lora_

if TYPE_CHECKING:
    from mmlm.connectors.qformer import QFormer
    from mmlm.models.blip2 import Blip2

# transformers maps no AutoModel to the BLIP-2 vision tower; registering it lets HFVisionEncoder build one
# from scratch (``model_type: blip_2_vision_model``), in code and in YAML.
AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)

PARTS = ("vision_model.", "qformer.", "language_projection.", "language_model.")
#: ``Blip2VisionModel``'s final norm (LAVIS's ``ln_vision``), which mmlm keeps as the Q-Former's ``vision_norm``.
POST_LAYERNORM = "post_layernorm."
# BLIP-2's image processor defaults (OpenAI CLIP statistics), used when a checkpoint has no processor file.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def split_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Full checkpoint → ``{"vision_model.": …, "qformer.": …, …}`` with the prefixes stripped.

    ``query_tokens`` goes to the ``qformer.`` part (as our QFormer holds it). Any other key raises.
    """
    return split_by_prefix(state, PARTS, source, routes={"query_tokens": "qformer."})


def image_preprocess(directory: Path, size: int) -> ImagePreprocess:
    """The checkpoint's ``BlipImageProcessor`` settings as an ``ImagePreprocess``: size, mean/std and
    resample, ``resize="squash"`` (a square resize without crop, as the processor and LAVIS's eval transform).
    Without a ``preprocessor_config.json``: BLIP-2's defaults (CLIP mean/std, ``size`` × ``size``, bicubic
    squash).

    Args:
        directory: the checkpoint directory.
        size: the vision config's ``image_size``.

    Raises:
        ValueError: the processor's size is not ``size`` × ``size`` (both are named), its ``resample`` is
            neither bilinear nor bicubic, or it skips a step mmlm does (resize, rescale by 1/255, normalise)
            or adds one (centre crop).
    """
    try:
        processor = BlipImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError):  # no preprocessor_config.json
        return ImagePreprocess((size, size), CLIP_MEAN, CLIP_STD, resize="squash", interpolation="bicubic")
    processor_size = (processor.size.get("height"), processor.size.get("width"))
    if processor_size != (size, size):
        raise ValueError(f"{directory}: image processor size (height, width) {processor_size} differs from "
                         f"the vision config's image_size {size}")
    check_blip_processor(processor, directory)
    return ImagePreprocess(processor_size, tuple(processor.image_mean), tuple(processor.image_std),
                           resize="squash", interpolation=interpolation_of(processor.resample))


def check_blip_processor(processor: BlipImageProcessor, directory: Path) -> None:
    """Raise ``ValueError`` when ``processor`` does something else than resize → rescale 1/255 → normalise."""
    steps = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_center_crop": False}
    wrong = {k: getattr(processor, k, None) for k, v in steps.items()
             if bool(getattr(processor, k, None)) != v}
    if abs(float(processor.rescale_factor) * 255 - 1) > 1e-9:
        wrong["rescale_factor"] = processor.rescale_factor
    if wrong:
        raise ValueError(f"{directory}: image processor settings {wrong} are not supported (mmlm resizes, "
                         "rescales by 1/255 and normalises)")


def checkpoint_end_token(directory: Path, config: Blip2Config) -> int | None:
    """The id at which the checkpoint's text ends: the eos of its ``generation_config.json``, else of its text config
    (``None`` when neither names one).

    Raises:
        ValueError: the checkpoint names several eos ids (naming them; pass ``end_token_id`` to choose one).
    """
    if (directory / GENERATION_CONFIG_NAME).is_file():
        eos = HFGenerationConfig.from_pretrained(str(directory)).eos_token_id
    else:
        eos = config.text_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if len(ids) > 1:
        raise ValueError(f"{directory}: the checkpoint ends text at any of the eos ids {ids}; Blip2 trains one end "
                         "token: pass end_token_id")
    return ids[0] if ids else None


def _language_model(text_config: Any, seq2seq: bool, state: Mapping[str, torch.Tensor], source: str,
                    **options: Any) -> HFLanguageModel:
    """The frozen LM adapter of the checkpoint's text config with its ``language_model.*`` weights and ``options``
    (``dtype``, ``attn_implementation``, ``quantization``, ``lora``: :func:`mmlm.convert.language_part.language_part`)."""
    config = {k: v for k, v in text_config.to_dict().items() if k not in ("architectures", "transformers_version")}
    adapter = HFSeq2SeqLM if seq2seq else HFCausalLM
    return language_part(adapter, config, state, f"{source} language_model.*", freeze=True, **options)


def blip2_from_hf(cls: type[Blip2], name_or_path: str, tokenizer: str | None = None, vision_dtype: str | None = None,
                  lm_dtype: str | None = None, attn_implementation: str | None = None, quantization: str | None = None,
                  lora: LoRA | None = None, end_token_id: int | None = None, **kwargs: Any) -> Blip2:
    """Build ``cls`` (:class:`mmlm.models.Blip2`) from a ``Blip2ForConditionalGeneration`` checkpoint, strictly.

    Args:
        name_or_path: ``save_pretrained`` directory or hub id.
        tokenizer: tokenizer directory/hub id; default the checkpoint's own.
        vision_dtype, lm_dtype: dtypes of the frozen ViT and LM (default float32); the Q-Former stays fp32.
        attn_implementation, quantization, lora: the LM adapter's options
            (:class:`~mmlm.language.hf_base.HFLanguageModel`): attention kernel, bitsandbytes ``"4bit"``/``"8bit"``
            weights (CUDA only), LoRA adapters (then only they train in the LM).
        end_token_id: the token that ends targets and stops generation; ``None``: the checkpoint's
            (:func:`checkpoint_end_token`).
        **kwargs: further :class:`Blip2` arguments (optimisation, generation).
    """
    directory, state = read_checkpoint(name_or_path)
    config = Blip2Config.from_pretrained(str(directory))
    parts = split_state_dict(state, name_or_path)
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("model_type", "architectures",
                                                                                    "transformers_version")}
    encoder = HFVisionEncoder(config=vision, model_type="blip_2_vision_model", freeze=True, dtype=vision_dtype,
                              layer=config.vision_config.num_hidden_layers)  # before post_layernorm = vision_norm
    load_part(encoder.model, parts["vision_model."], f"{name_or_path} vision_model.*")
    encoder.preprocess = image_preprocess(directory, config.vision_config.image_size)
    lm = _language_model(config.text_config, not config.use_decoder_only_language_model, parts["language_model."],
                         name_or_path, dtype=lm_dtype, attn_implementation=attn_implementation,
                         quantization=quantization, lora=lora)
    encoder.source = lm.source = name_or_path  # their weights are re-read from the checkpoint
    qformer = qformer_kwargs_from_hf(config.qformer_config, config.num_query_tokens)
    for key in ("encoder_width", "num_query_tokens", "with_text", "vocab_size", "max_position_embeddings"):
        qformer.pop(key)
    qformer.update(vision_norm=True, vision_norm_eps=config.vision_config.layer_norm_eps)
    end_token_id = end_token_id if end_token_id is not None else checkpoint_end_token(directory, config)
    model = cls(encoder=encoder, language_model=lm, tokenizer=tokenizer or str(directory),
                num_query_tokens=config.num_query_tokens, qformer=qformer, end_token_id=end_token_id, **kwargs)
    vision_norm = {f"vision_norm.{k}": parts["vision_model."][f"{POST_LAYERNORM}{k}"] for k in ("weight", "bias")}
    load_part(model.qformer, qformer_from_hf(parts["qformer."]) | vision_norm, f"{name_or_path} qformer.*")
    load_part(model.language_projection, parts["language_projection."], f"{name_or_path} language_projection.*")
    encoder.model.post_layernorm.requires_grad_(False)  # unused (vision_norm is in its place): no gradient, even trained
    return model


def qformer_config_to_hf(qformer: QFormer) -> Blip2QFormerConfig:
    """A ``Blip2QFormerConfig`` describing a queries-only :class:`QFormer` (sizes read off its modules)."""
    layers = qformer.layers
    cross = [i for i, layer in enumerate(layers) if layer.cross_attn is not None]
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if not cross or cross != list(range(0, len(layers), freq)):
        raise ValueError(f"QFormer cross-attention layers {cross} are not 0, f, 2f, … (transformers' layout)")
    first = layers[0]
    return Blip2QFormerConfig(
        hidden_size=qformer.query_tokens.shape[-1], num_hidden_layers=len(layers),
        num_attention_heads=first.self_attn.num_heads, intermediate_size=first.query_ffn.fc1.out_features,
        cross_attention_frequency=freq, encoder_hidden_size=first.cross_attn.k.in_features,
        layer_norm_eps=qformer.embeddings.norm.eps, hidden_dropout_prob=qformer.embeddings.drop.p,
        attention_probs_dropout_prob=qformer.embeddings.drop.p, hidden_act="gelu")


def _check_exportable(model: Blip2) -> None:
    """Raise ``TypeError`` when a part has no place in ``Blip2ForConditionalGeneration``."""
    if not (isinstance(model.encoder, HFVisionEncoder) and model.encoder.model.config.model_type
            == "blip_2_vision_model"):
        raise TypeError(f"to_hf needs encoder = HFVisionEncoder over a Blip2VisionModel, got {type(model.encoder).__name__}")
    _check_vision_norm(model.encoder, model.qformer)
    if not isinstance(model.language_model, HFLanguageModel):
        raise TypeError(f"to_hf needs a Hugging Face LM adapter, got {type(model.language_model).__name__}")
    if model.qformer.with_text:
        raise TypeError("to_hf needs a queries-only QFormer (with_text=False)")


def _check_vision_norm(encoder: HFVisionEncoder, qformer: QFormer) -> None:
    """Raise ``TypeError`` unless exactly one LayerNorm, placed as transformers' ``post_layernorm``, sits between
    the ViT's last layer and the Q-Former: the Q-Former's ``vision_norm`` after ``layer = num_hidden_layers`` (with
    the vision config's epsilon), or none after ``layer = -1`` (``last_hidden_state``, already normalised)."""
    config, norm = encoder.model.config, qformer.vision_norm
    if norm is None and encoder.layer == -1:
        return
    if norm is None or encoder.layer != config.num_hidden_layers:
        raise TypeError(f"to_hf needs the encoder's layer {config.num_hidden_layers} (before post_layernorm) with the "
                        f"Q-Former's vision_norm, or layer -1 without it; got layer {encoder.layer} and vision_norm "
                        f"{'on' if norm is not None else 'off'}")
    if norm.eps != config.layer_norm_eps:
        raise TypeError(f"to_hf: the Q-Former's vision_norm_eps {norm.eps} differs from the vision config's "
                        f"layer_norm_eps {config.layer_norm_eps}, with which transformers applies post_layernorm")


def blip2_state_to_hf(model: Blip2) -> dict[str, torch.Tensor]:
    """Our module's weights under ``Blip2ForConditionalGeneration`` keys (``qformer.vision_norm`` as
    ``vision_model.post_layernorm``; an LM's LoRA adapters merged into a copy of its weights)."""
    state = {f"vision_model.{k}": v for k, v in model.encoder.model.state_dict().items()}
    qformer = model.qformer.state_dict()
    for key in [k for k in qformer if k.startswith("vision_norm.")]:
        state[f"vision_model.{POST_LAYERNORM}{key.removeprefix('vision_norm.')}"] = qformer.pop(key)
    for key, value in qformer_to_hf(qformer).items():
        state[key if key == "query_tokens" else f"qformer.{key}"] = value
    state |= {f"language_projection.{k}": v for k, v in model.language_projection.state_dict().items()}
    lm = model.language_model.model
    lm = merge_lora_(copy.deepcopy(lm)) if model.language_model.lora is not None else lm  # LoRA merged in
    state |= {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    return state


def blip2_to_hf(model: Blip2, directory: str | Path) -> None:
    """Write ``directory`` so ``Blip2ForConditionalGeneration.from_pretrained`` / ``Blip2Processor`` load it:
    config, safetensors weights, generation config (eos: the model's ``end_token_id`` when set), tokenizer (with
    ``<image>``) and image processor."""
    _check_exportable(model)
    config = Blip2Config(vision_config=model.encoder.model.config.to_dict(),
                         qformer_config=qformer_config_to_hf(model.qformer).to_dict(),
                         text_config=model.language_model.model.config.to_dict(),
                         num_query_tokens=model.qformer.num_query_tokens, image_token_index=model.image_token_id)
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    load_part(hf, {k: v.detach() for k, v in blip2_state_to_hf(model).items()}, "Blip2 export", assign=True)
    hf.tie_weights()
    if model.end_token_id is not None:
        hf.generation_config.eos_token_id = model.end_token_id
    hf.save_pretrained(str(directory))
    Blip2Processor(blip_image_processor(model.encoder.preprocess), model.tokenizer,
                   num_query_tokens=model.qformer.num_query_tokens).save_pretrained(str(directory))


def blip_image_processor(preprocess: ImagePreprocess) -> BlipImageProcessor:
    """The ``BlipImageProcessor`` of ``preprocess`` (size, mean/std, resample); it squashes, so a ``"crop"``
    preprocess (a BLIP-2 built from scratch) is exported as a squash, with a warning."""
    if preprocess.resize != "squash":
        warnings.warn(f"BLIP-2 export: the model preprocesses with resize={preprocess.resize!r}; "
                      "transformers' BlipImageProcessor (written with the checkpoint) squashes to the square size",
                      stacklevel=3)
    return BlipImageProcessor(size={"height": preprocess.size[0], "width": preprocess.size[1]},
                              image_mean=list(preprocess.mean), image_std=list(preprocess.std),
                              resample=INTERPOLATIONS[preprocess.interpolation])
