"""Strict import/export of whole ``transformers.Blip2ForConditionalGeneration`` and
``InstructBlipForConditionalGeneration`` checkpoints.

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

InstructBLIP is BLIP-2 with instruction-aware queries (:class:`~mmlm.models.Blip2`'s ``qformer_text_input``): the same
parts, plus the Q-Former's text side (word and position embeddings, text FFNs) and its BERT tokenizer (the
checkpoint's ``qformer_tokenizer/`` folder); its Q-Former input norm is ``qformer.embeddings.layernorm``, BLIP-2's
``qformer.layernorm``. A model with instruction-aware queries exports as InstructBLIP.
"""

from __future__ import annotations

import copy
import json
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
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
)
from transformers import GenerationConfig as HFGenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME

from mmlm.convert.blip2 import bert_text_side, qformer_from_hf, qformer_kwargs_from_hf, qformer_to_hf
from mmlm.convert.keys import assign_part, empty_weights, load_part, read_checkpoint, split_by_prefix
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
#: The ``model_type`` of each checkpoint kind :func:`blip2_from_hf` reads.
CONFIGS = {"blip-2": Blip2Config, "instructblip": InstructBlipConfig}
#: The Q-Former's input norm: InstructBLIP's key, BLIP-2's key.
INSTRUCT_NORM = ("qformer.embeddings.layernorm.", "qformer.layernorm.")
#: The subfolder of an InstructBLIP checkpoint that holds the Q-Former's tokenizer (``InstructBlipProcessor``).
QFORMER_TOKENIZER = "qformer_tokenizer"
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


def checkpoint_config(directory: Path) -> Blip2Config | InstructBlipConfig:
    """The checkpoint's ``Blip2Config`` or ``InstructBlipConfig``, by the ``model_type`` of its ``config.json``.

    Raises:
        ValueError: another model type (naming the file, the type and the two read).
    """
    path = directory / "config.json"
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(f"{path}: model_type {model_type!r}; Blip2.from_hf reads {sorted(CONFIGS)} "
                         "(Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration)")
    return CONFIGS[model_type].from_pretrained(str(directory))


def instruction_inputs(directory: Path, config: Blip2Config | InstructBlipConfig, qformer_text_input: bool | None,
                       qformer_tokenizer: str | None, qformer_text_from: str | None,
                       ) -> tuple[bool, str | None, dict[str, torch.Tensor], dict[str, int]]:
    """Whether the imported model reads instructions, its Q-Former tokenizer, and — for a queries-only checkpoint —
    the text side from ``qformer_text_from`` (BERT) with its table sizes.

    Raises:
        ValueError: a combination that cannot work (each names the argument to change).
    """
    instruct = config.model_type == "instructblip"
    reads = instruct if qformer_text_input is None else qformer_text_input
    if instruct and not reads:
        raise ValueError(f"{directory} is an InstructBLIP checkpoint, trained with instruction-aware queries: "
                         "qformer_text_input=false would drop its Q-Former's text side")
    if not reads:
        if qformer_tokenizer is not None or qformer_text_from is not None:
            raise ValueError("Blip2.from_hf: qformer_tokenizer and qformer_text_from are read only with "
                             "qformer_text_input=true")
        return False, None, {}, {}
    if instruct:
        if qformer_text_from is not None:
            raise ValueError(f"{directory} holds its Q-Former's text side: qformer_text_from is for BLIP-2 checkpoints")
        local = directory / QFORMER_TOKENIZER
        tokenizer = qformer_tokenizer or (str(local) if local.is_dir() else None)
        if tokenizer is None:
            raise ValueError(f"{directory} has no {QFORMER_TOKENIZER}/ folder: give qformer_tokenizer=<BERT tokenizer>")
        sizes = dict(vocab_size=config.qformer_config.vocab_size,
                     max_position_embeddings=config.qformer_config.max_position_embeddings)
        return True, tokenizer, {}, sizes
    if qformer_text_from is None:
        raise ValueError(f"{directory} is a BLIP-2 checkpoint whose Q-Former has no text side (transformers' "
                         "conversion drops it): qformer_text_input=true needs qformer_text_from=<a BERT checkpoint, "
                         "e.g. bert-base-uncased> for its word embeddings and text FFNs")
    text, sizes = bert_text_side(qformer_text_from)
    return True, qformer_tokenizer or qformer_text_from, text, sizes


def checkpoint_end_token(directory: Path, config: Blip2Config | InstructBlipConfig) -> int | None:
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
                  lora: LoRA | None = None, end_token_id: int | None = None, qformer_text_input: bool | None = None,
                  qformer_tokenizer: str | None = None, qformer_text_from: str | None = None, **kwargs: Any) -> Blip2:
    """Build ``cls`` (:class:`mmlm.models.Blip2`) from a ``Blip2ForConditionalGeneration`` or
    ``InstructBlipForConditionalGeneration`` checkpoint, strictly.

    Args:
        name_or_path: ``save_pretrained`` directory or hub id.
        tokenizer: tokenizer directory/hub id; default the checkpoint's own.
        vision_dtype, lm_dtype: dtypes of the frozen ViT and LM (default float32); the Q-Former stays fp32.
        attn_implementation, quantization, lora: the LM adapter's options
            (:class:`~mmlm.language.hf_base.HFLanguageModel`): attention kernel, bitsandbytes ``"4bit"``/``"8bit"``
            weights (CUDA only), LoRA adapters (then only they train in the LM).
        end_token_id: the token that ends targets and stops generation; ``None``: the checkpoint's
            (:func:`checkpoint_end_token`).
        qformer_text_input: instruction-aware queries; ``None``: the checkpoint's (InstructBLIP: yes, BLIP-2: no).
        qformer_tokenizer: the Q-Former's tokenizer; ``None``: the checkpoint's ``qformer_tokenizer/`` folder
            (InstructBLIP) or ``qformer_text_from``.
        qformer_text_from: a BERT checkpoint whose word/position embeddings and text FFNs give a BLIP-2 checkpoint's
            queries-only Q-Former the text side that instruction-aware queries need (InstructBLIP's Q-Former starts
            from ``bert-base-uncased`` too); only for ``qformer_text_input`` on a BLIP-2 checkpoint.
        **kwargs: further :class:`Blip2` arguments (optimisation, generation).
    """
    directory, state = read_checkpoint(name_or_path)
    config = checkpoint_config(directory)
    reads, qformer_tokenizer, text_side, text_sizes = instruction_inputs(directory, config, qformer_text_input,
                                                                         qformer_tokenizer, qformer_text_from)
    old, new = INSTRUCT_NORM
    state = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in state.items()}
    parts = split_state_dict(state, name_or_path)
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("model_type", "architectures",
                                                                                    "transformers_version")}
    with empty_weights():  # no random ViT first: the checkpoint's tensors become its weights
        encoder = HFVisionEncoder(config=vision, model_type="blip_2_vision_model", freeze=True, dtype=vision_dtype,
                                  layer=config.vision_config.num_hidden_layers)  # before post_layernorm = vision_norm
    assign_part(encoder.model, parts["vision_model."], f"{name_or_path} vision_model.*")
    encoder.preprocess = image_preprocess(directory, config.vision_config.image_size)
    lm = _language_model(config.text_config, not config.use_decoder_only_language_model, parts["language_model."],
                         name_or_path, dtype=lm_dtype, attn_implementation=attn_implementation,
                         quantization=quantization, lora=lora)
    encoder.source = lm.source = name_or_path  # their weights are re-read from the checkpoint
    qformer = qformer_kwargs_from_hf(config.qformer_config, config.num_query_tokens)
    for key in ("encoder_width", "num_query_tokens", "with_text", "vocab_size", "max_position_embeddings"):
        qformer.pop(key)
    qformer.update(vision_norm=True, vision_norm_eps=config.vision_config.layer_norm_eps, **text_sizes)
    end_token_id = end_token_id if end_token_id is not None else checkpoint_end_token(directory, config)
    model = cls(encoder=encoder, language_model=lm, tokenizer=tokenizer or str(directory),
                num_query_tokens=config.num_query_tokens, qformer=qformer, end_token_id=end_token_id,
                qformer_text_input=reads, qformer_tokenizer=qformer_tokenizer, **kwargs)
    vision_norm = {f"vision_norm.{k}": parts["vision_model."][f"{POST_LAYERNORM}{k}"] for k in ("weight", "bias")}
    load_part(model.qformer, qformer_from_hf(parts["qformer."]) | vision_norm | text_side, f"{name_or_path} qformer.*")
    load_part(model.language_projection, parts["language_projection."], f"{name_or_path} language_projection.*")
    return model


def qformer_config_to_hf(qformer: QFormer) -> Blip2QFormerConfig | InstructBlipQFormerConfig:
    """A ``Blip2QFormerConfig`` describing a queries-only :class:`QFormer`, or an ``InstructBlipQFormerConfig`` for one
    with a text side (sizes read off its modules)."""
    layers = qformer.layers
    cross = [i for i, layer in enumerate(layers) if layer.cross_attn is not None]
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if not cross or cross != list(range(0, len(layers), freq)):
        raise ValueError(f"QFormer cross-attention layers {cross} are not 0, f, 2f, … (transformers' layout)")
    first = layers[0]
    text = {} if not qformer.with_text else dict(vocab_size=qformer.embeddings.word.num_embeddings,
                                                  max_position_embeddings=qformer.embeddings.position.num_embeddings)
    return (InstructBlipQFormerConfig if qformer.with_text else Blip2QFormerConfig)(
        **text, hidden_size=qformer.query_tokens.shape[-1], num_hidden_layers=len(layers),
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
    old, new = INSTRUCT_NORM
    for key, value in qformer_to_hf(qformer).items():
        key = key if key == "query_tokens" else f"qformer.{key}"
        state[old + key.removeprefix(new) if model.qformer.with_text and key.startswith(new) else key] = value
    state |= {f"language_projection.{k}": v for k, v in model.language_projection.state_dict().items()}
    lm = model.language_model.model
    lm = merge_lora_(copy.deepcopy(lm)) if model.language_model.lora is not None else lm  # LoRA merged in
    state |= {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    return state


def blip2_to_hf(model: Blip2, directory: str | Path) -> None:
    """Write ``directory`` so ``Blip2ForConditionalGeneration.from_pretrained`` / ``Blip2Processor`` load it (or, for
    instruction-aware queries, ``InstructBlipForConditionalGeneration`` / ``InstructBlipProcessor``, with the
    Q-Former's tokenizer in ``qformer_tokenizer/``): config, safetensors weights, generation config (eos: the model's
    ``end_token_id`` when set), tokenizer (with ``<image>``) and image processor."""
    _check_exportable(model)
    instruct = model.qformer.with_text
    vision = {k: v for k, v in model.encoder.model.config.to_dict().items() if k != "model_type"}
    config = (InstructBlipConfig if instruct else Blip2Config)(
        vision_config=vision, qformer_config=qformer_config_to_hf(model.qformer).to_dict(),
        text_config=model.language_model.model.config.to_dict(), num_query_tokens=model.qformer.num_query_tokens,
        image_token_index=model.image_token_id)
    with torch.device("meta"):
        hf = (InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration)(config)
    load_part(hf, {k: v.detach() for k, v in blip2_state_to_hf(model).items()}, "Blip2 export", assign=True)
    hf.tie_weights()
    if model.end_token_id is not None:
        hf.generation_config.eos_token_id = model.end_token_id
    hf.save_pretrained(str(directory))
    images = blip_image_processor(model.encoder.preprocess)
    processor = (InstructBlipProcessor(images, model.tokenizer, model.qformer_tokenizer,
                                       num_query_tokens=model.qformer.num_query_tokens) if instruct
                 else Blip2Processor(images, model.tokenizer, num_query_tokens=model.qformer.num_query_tokens))
    processor.save_pretrained(str(directory))


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
