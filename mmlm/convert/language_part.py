"""The language model of a composite Hugging Face checkpoint (BLIP-2's ``language_model.*``, Donut's ``decoder.*``)
as an mmlm LM adapter, with the adapter's loading options: ``lora``, ``attn_implementation`` and ``quantization``.

Without quantization the adapter is built from the text config with its parameters on the meta device
(:func:`mmlm.convert.keys.empty_weights`) and the checkpoint's tensors are put in their place strictly
(:func:`mmlm.convert.keys.assign_part`), then LoRA is added: no random weights are allocated first. bitsandbytes quantizes weights as ``from_pretrained``
reads them, so with ``quantization`` the part is first written to a temporary directory (config + safetensors) that
the adapter loads (its caller then sets ``source`` to the checkpoint).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmlm.convert.keys import assign_part, empty_weights
from mmlm.hub import build_hf_config
from mmlm.language.hf_base import HFLanguageModel
from mmlm.lora import LoRA


def language_part(adapter: type[HFLanguageModel], config: dict[str, Any], state: Mapping[str, torch.Tensor],
                  where: str, *, freeze: bool, dtype: str | None = None, grad_checkpointing: bool = False,
                  attn_implementation: str | None = None, quantization: str | None = None,
                  lora: LoRA | None = None) -> HFLanguageModel:
    """``adapter`` (``HFCausalLM``, ``HFSeq2SeqLM``, ``CrossAttentionLM``) over ``config`` with the weights
    ``state`` (keys of the transformers model, the part's prefix stripped). The caller sets its ``source``, the
    checkpoint (with quantization the adapter read a temporary directory).

    Args:
        adapter: the LM adapter class.
        config: the part's config dict (with ``model_type``).
        state: its weights.
        where: the checkpoint and part they come from, named in errors (``"<dir> language_model.*"``).
        freeze, dtype, grad_checkpointing, attn_implementation, quantization, lora: the adapter's arguments
            (:class:`~mmlm.language.hf_base.HFLanguageModel`).

    Raises:
        RuntimeError: a missing or unexpected weight (naming it).
        ValueError: an option the adapter refuses (``quantization`` without a CUDA GPU, …).
    """
    options = dict(freeze=freeze, dtype=dtype, grad_checkpointing=grad_checkpointing,
                   attn_implementation=attn_implementation)
    if quantization is None:
        with empty_weights():  # no random weights: the checkpoint's tensors become them
            lm = adapter(config=config, **options)
        assign_part(lm.model, state, where)
        if lora is not None:
            lm.add_lora(lora)
    else:
        with tempfile.TemporaryDirectory(prefix="mmlm-lm-part-") as directory:
            write_part(config, state, Path(directory))
            lm = adapter(name_or_path=directory, quantization=quantization, lora=lora, **options)
    return lm


def write_part(config: dict[str, Any], state: Mapping[str, torch.Tensor], directory: Path) -> None:
    """A ``save_pretrained``-style directory of one part: ``config.json`` and ``model.safetensors`` (a tensor that
    shares storage with an earlier one, a tied weight, is written as its own copy)."""
    from safetensors.torch import save_file

    build_hf_config(config).save_pretrained(str(directory))
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.detach().clone().contiguous() if pointer in seen else value.detach().contiguous()
        seen.add(pointer)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
