"""The shared base of the Hugging Face adapters (causal and seq2seq) and its loading helpers.

``HFLanguageModel`` holds what the adapters share: loading (strict) or building from a config dict,
the embedding table, generation settings, resizing and saving. Subclasses add the forward pass.

Shape legend: B batch, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmlm.freezing import freeze_, parse_dtype
from mmlm.hub import build_hf_config, check_hf_loading_info, config_kwargs, id_list, require_local, sub_state
from mmlm.language.base import GenerationConfig, LanguageModel, LMOutput
from mmlm.language.recompute import hf_blocks, recompute_blocks
from mmlm.lora import LoRA, default_targets, merge_lora_
from mmlm.losses import causal_head_loss, causal_lm_loss

#: Config settings with which a transformers LM changes its logits after the output head (softcapping, scaling):
#: such a model computes its loss from its own full logits instead of the head's target rows.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")

#: ``quantization`` values: bitsandbytes 8-bit (LLM.int8) or 4-bit NF4 weights (QLoRA).
QUANTIZATIONS = ("8bit", "4bit")


def bnb_config(quantization: str, dtype: torch.dtype | None) -> Any:
    """The ``BitsAndBytesConfig`` of ``quantization``: ``"8bit"`` LLM.int8, or ``"4bit"`` as QLoRA (NF4, double
    quantisation, computing in ``dtype``, default bfloat16).

    Raises:
        ValueError: an unknown value, or no CUDA GPU (bitsandbytes quantises on the GPU).
    """
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS} (or null)")
    if not torch.cuda.is_available():
        raise ValueError(f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes), and none is available "
                         "here: set quantization: null (and a dtype such as bfloat16) to run on this machine")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.bfloat16)


def load_kwargs(dtype: torch.dtype | None, attn_implementation: str | None,
                quantization: str | None) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` (and, without quantization, ``from_config``): ``dtype``,
    ``attn_implementation``, and for a quantized load ``quantization_config`` with this rank's GPU as
    ``device_map`` (``LOCAL_RANK``; bitsandbytes weights cannot be moved later)."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kwargs


def load_language_model(auto_class: Any, name_or_path: str | None, config: dict[str, Any] | None,
                        **kwargs: Any) -> nn.Module:
    """Load ``name_or_path`` strictly with ``from_pretrained(**kwargs)``, or build a randomly initialised model from
    ``config`` (``from_config``).

    Raises:
        ValueError: neither or both of ``name_or_path`` and ``config``; a quantized ``config`` (bitsandbytes
            quantises weights as they are loaded).
        FileNotFoundError: ``name_or_path`` is a local path that does not exist.
        RuntimeError: missing, unexpected or misshapen weights, naming the keys.
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of name_or_path (hub id or local directory) and config "
                         f"(dict with 'model_type'); got name_or_path={name_or_path!r}, config={config!r}")
    if name_or_path is None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization needs pretrained weights (name_or_path), not a config dict")
        return auto_class.from_config(build_hf_config(config), **kwargs)
    require_local(name_or_path, "language model directory")
    model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    check_hf_loading_info(info, name_or_path)
    return model


class HFLanguageModel(LanguageModel):
    """Shared base of the Hugging Face adapters; ``auto_class`` picks causal or seq2seq models.

    Args:
        name_or_path: hub id or local directory (``from_pretrained``, also what ``save_pretrained`` writes).
        config: instead of ``name_or_path``, a dict with a ``model_type`` key and config fields for a
            randomly initialised model, e.g. ``{"model_type": "gpt2", "vocab_size": 50, "n_embd": 32,
            "n_layer": 2, "n_head": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}``.
            Special-token ids must lie inside ``vocab_size`` (GPT-2's default 50256 does not, so a small
            GPT-2 vocabulary must set bos/eos explicitly); otherwise a ValueError names the key.
        freeze: no gradients and eval mode kept; gradients still flow to ``inputs_embeds``.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``…; ``None`` keeps transformers' default:
            float32 for ``config``, the checkpoint's own dtype for ``name_or_path`` (transformers 5
            loads with ``dtype="auto"``, so e.g. OPT's fp16 weights stay fp16).
        grad_checkpointing: recompute each block's activations in the backward pass (non-reentrant), in train and
            eval mode alike, so a frozen LM that gradients flow through saves memory too
            (:mod:`mmlm.language.recompute`).
        attn_implementation: transformers' attention kernel (``"sdpa"``, ``"eager"``, ``"flash_attention_2"`` where
            flash-attn is installed…); ``None`` keeps transformers' default (sdpa where the model supports it).
        quantization: ``"4bit"`` (NF4, QLoRA) or ``"8bit"`` bitsandbytes weights, loaded onto this rank's GPU; needs
            ``name_or_path`` and a CUDA GPU (refused otherwise). The quantized base is frozen: train it through
            ``lora``.
        lora: LoRA adapters (:class:`~mmlm.lora.LoRA`): the base weights are frozen whatever ``freeze`` says and only
            the adapters train; ``target_modules: null`` adapts the attention q/k/v/output projections.

    transformers 5 always loads weights without a random initialisation first (``low_cpu_mem_usage`` is ignored
    there), so there is no such switch.
    """

    auto_class: ClassVar[Any]

    def __init__(self, name_or_path: str | None = None, config: dict | None = None, freeze: bool = False,
                 dtype: str | None = None, grad_checkpointing: bool = False, attn_implementation: str | None = None,
                 quantization: str | None = None, lora: LoRA | None = None) -> None:
        super().__init__()
        self.model = load_language_model(self.auto_class, name_or_path, config,
                                         **load_kwargs(parse_dtype(dtype), attn_implementation, quantization))
        self.source = name_or_path
        self.quantization = quantization
        self.check_model()
        if quantization is not None:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=False)
        if grad_checkpointing:
            recompute_blocks(hf_blocks(self.model))
        self.setup_freezing(freeze or quantization is not None, dtype if quantization is None else None)
        if lora is not None:
            self.add_lora(lora)

    def lora_root(self) -> nn.Module:
        """The transformers model."""
        return self.model

    def lora_targets(self) -> list[str]:
        """The attention projections of the model's type (:func:`mmlm.lora.default_targets`)."""
        return default_targets(self.model.config.model_type)

    def offline_args(self) -> dict[str, Any]:
        """Built from the model's own config (``config``), no ``name_or_path`` to read weights from (nor quantization,
        which needs them)."""
        return {"name_or_path": None, "config": config_kwargs(self.model.config), "quantization": None}

    def plain_head(self) -> nn.Module | None:
        """The output head when the logits are ``head(base_model(...).last_hidden_state)`` exactly (no softcapping
        or scaling after it, :data:`HEAD_TRANSFORMS`, and a base model apart from the head), else ``None``."""
        config, head = self.model.config, self.model.get_output_embeddings()
        transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in HEAD_TRANSFORMS)
        return None if transformed or head is None or self.model.base_model is self.model else head

    def causal_output(self, labels: torch.Tensor | None, **model_kwargs: Any) -> LMOutput:
        """Run the causal model on ``model_kwargs`` (``inputs_embeds [B, T, D]``, ``attention_mask``…) → the
        next-token loss against ``labels [B, T]`` (``None``: no loss) and ``logits [B, T, V]``.

        With a :meth:`plain_head`, the base model gives the hidden states, the loss reads the head's logits at the
        target positions only (:func:`~mmlm.losses.causal_head_loss`) and the full logits are computed when read
        (:class:`~mmlm.language.base.LMOutput`); otherwise the model's own full logits serve both.
        """
        head = self.plain_head()
        if head is None:
            logits = self.model(**model_kwargs, use_cache=False).logits
            return LMOutput(loss=None if labels is None else causal_lm_loss(logits, labels), logits=logits)
        hidden = self.model.base_model(**model_kwargs, use_cache=False).last_hidden_state
        loss = None if labels is None else causal_head_loss(hidden, head, labels)
        return LMOutput(loss=loss, hidden=hidden, head=head)

    def check_model(self) -> None:
        """Hook for subclasses: raise ``ValueError`` when ``self.model`` cannot serve this adapter."""

    @property
    def width(self) -> int:
        """D, the width of ``inputs_embeds`` (the input embedding table's)."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        """V, rows of the input embedding table (= logits width)."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LM's parameters; ``inputs_embeds`` are cast to it."""
        return self.model.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` → ``embeddings [B, T, D]`` from the LM's input embedding table."""
        return self.model.get_input_embeddings()(input_ids)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the embedding table and (tied or not) output head to ``vocab_size`` rows.

        A frozen LM stays frozen: the new rows get no gradients either.
        """
        self.model.resize_token_embeddings(vocab_size)
        if self.frozen:
            freeze_(self)

    def save_pretrained(self, directory: str, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write weights, config and generation config so ``type(self)(name_or_path=directory)`` reloads them; LoRA
        adapters are merged into the written weights (this adapter keeps them). ``state_dict``: this adapter's
        weights as gathered from FSDP2 shards (``model.*`` keys), written instead of the module's own.

        Raises:
            ValueError: ``state_dict`` with LoRA adapters (merge them from a checkpoint with ``mmlm export``).
        """
        if state_dict is not None:
            if self.lora is not None:
                raise ValueError("save_pretrained: LoRA adapters are merged from the module, not from a gathered "
                                 "state dict; export the checkpoint with `mmlm export` instead")
            self.model.save_pretrained(directory, state_dict=sub_state(state_dict, "model."))
            return
        model = merge_lora_(copy.deepcopy(self.model)) if self.lora is not None else self.model
        model.save_pretrained(directory)

    def generation_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        """``GenerationConfig`` → keyword arguments for ``transformers`` ``generate``.

        Settings not in ``GenerationConfig`` (e.g. ``forced_eos_token_id``) come from the model's own
        ``generation_config``. With ``do_sample`` the three sampling settings are always passed, so the model's
        own ``temperature``/``top_k``/``top_p`` (transformers defaults ``top_k`` to 50) never apply unseen;
        without it they are left out (greedy or beam search, as before). Finished rows are padded with the pad
        id, or eos where there is none.
        """
        eos = id_list(self.model.generation_config.eos_token_id)
        pad = self.model.generation_config.pad_token_id
        kwargs = {"max_new_tokens": config.max_new_tokens, "min_new_tokens": config.min_new_tokens,
                  "num_beams": config.num_beams, "length_penalty": config.length_penalty,
                  "repetition_penalty": config.repetition_penalty, "do_sample": config.do_sample,
                  "num_return_sequences": 1, "pad_token_id": pad if pad is not None else (eos or [0])[0]}
        if config.do_sample:
            kwargs |= {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
        return kwargs
