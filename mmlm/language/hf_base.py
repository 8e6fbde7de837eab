"""The shared base of the Hugging Face adapters (causal and seq2seq) and its loading helpers.

``HFLanguageModel`` holds what the adapters share: loading (strict) or building from a config dict,
the embedding table, generation settings, resizing and saving. Subclasses add the forward pass.

Shape legend: B batch, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mmlm.freezing import freeze_, parse_dtype
from mmlm.hub import config_kwargs, id_list, load_hf_model
from mmlm.language.base import GenerationConfig, LanguageModel


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
        grad_checkpointing: recompute activations in the backward pass (non-reentrant) while training.
    """

    auto_class: ClassVar[Any]

    def __init__(self, name_or_path: str | None = None, config: dict | None = None, freeze: bool = False,
                 dtype: str | None = None, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = load_hf_model(self.auto_class, name_or_path, config, parse_dtype(dtype))
        self.source = name_or_path
        self.check_model()
        if grad_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.setup_freezing(freeze, dtype)

    def offline_args(self) -> dict[str, Any]:
        """Built from the model's own config (``config``), no ``name_or_path`` to read weights from."""
        return {"name_or_path": None, "config": config_kwargs(self.model.config)}

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

    def save_pretrained(self, directory: str) -> None:
        """Write weights, config and generation config so ``type(self)(name_or_path=directory)`` reloads them."""
        self.model.save_pretrained(directory)

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
