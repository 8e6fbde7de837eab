"""Bidirectional (non-causal) text encoders: token ids ``[K, L]`` → contextual vectors ``[K, L, D]``.

MetaLM encodes spans of the decoder's own token sequence, so a text encoder reads the decoder
tokenizer's ids (one shared vocabulary, as in the paper's language-only setting). Every real token
attends to every real token of its row (no causal mask); padding is masked as a key.

Shape legend: K rows (spans), L tokens per row, D width, V vocabulary.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn
from transformers import AutoModel

from mmlm.attention_masks import positions_from_mask
from mmlm.freezing import Freezable, freeze_, parse_dtype
from mmlm.hub import config_kwargs, load_hf_model


class TextEncoder(Freezable):
    """Token ids ``[K, L]`` + ``attention_mask [K, L]`` → ``[K, L, D]``, bidirectional over real tokens.

    Implementations provide ``width`` (D), ``vocab_size`` (V), ``resize_token_embeddings`` and call
    ``setup_freezing(freeze, dtype)`` last.
    """

    width: int
    vocab_size: int

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids [K, L]``, ``attention_mask [K, L]`` (1 real) → ``[K, L, D]`` (padding rows unspecified)."""

    @abstractmethod
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the token table to ``vocab_size`` rows, keeping the old rows."""


class TransformerTextEncoder(TextEncoder):
    """A pre-LN Transformer encoder trained from scratch (``nn.TransformerEncoder``, SDPA kernels).

    Token + learned absolute position embeddings (positions count real tokens, so left and right
    padding give the same vectors), ``depth`` pre-LN layers with GELU FFNs, a final LayerNorm.

    Args:
        vocab_size: V, rows of the token table (grown to the tokenizer by the model when smaller).
        width: D.
        depth: layers.
        num_heads: attention heads (must divide ``width``).
        ffn_mult: FFN hidden width is ``ffn_mult * width``.
        max_positions: longest row.
        dropout: attention and residual dropout (training only; the paper uses 0.1 in the encoder).
        freeze: no gradients and eval mode kept.
        dtype: parameter dtype (``"bfloat16"``, …); ``None`` keeps float32.
    """

    def __init__(self, vocab_size: int, width: int = 256, depth: int = 4, num_heads: int = 4, ffn_mult: int = 4,
                 max_positions: int = 512, dropout: float = 0.0, freeze: bool = False,
                 dtype: str | None = None) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"TransformerTextEncoder: width={width} is not divisible by num_heads={num_heads}")
        self.embed_tokens = nn.Embedding(vocab_size, width)
        self.embed_positions = nn.Embedding(max_positions, width)
        layer = nn.TransformerEncoderLayer(width, num_heads, ffn_mult * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed_tokens.weight, std=width ** -0.5)
        nn.init.normal_(self.embed_positions.weight, std=width ** -0.5)
        self.setup_freezing(freeze, dtype)

    @property
    def width(self) -> int:
        """D."""
        return self.embed_tokens.embedding_dim

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.embed_tokens.num_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids [K, L]``, ``attention_mask [K, L]`` → ``[K, L, D]``."""
        positions = positions_from_mask(attention_mask)
        if input_ids.shape[1] and int(positions.max()) >= self.embed_positions.num_embeddings:
            raise ValueError(f"TransformerTextEncoder: a row of {int(positions.max()) + 1} tokens exceeds "
                             f"max_positions={self.embed_positions.num_embeddings}")
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        x = self.layers(x, src_key_padding_mask=~attention_mask.bool())
        return self.final_norm(x)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the token table, keeping the old rows; new rows drawn like the initial ones."""
        old = self.embed_tokens.weight
        table = nn.Embedding(vocab_size, self.width, device=old.device, dtype=old.dtype)
        nn.init.normal_(table.weight, std=self.width ** -0.5)
        keep = min(vocab_size, old.shape[0])
        with torch.no_grad():
            table.weight[:keep] = old[:keep]
        self.embed_tokens = table
        if self.frozen:
            freeze_(self)


class HFTextEncoder(TextEncoder):
    """Any Hugging Face encoder (BERT, RoBERTa, ELECTRA, MiniLM, …) via ``AutoModel``: ``last_hidden_state``.

    Its vocabulary must be the decoder's (e.g. a Sub-LN decoder trained with the BERT tokenizer).

    Args:
        name_or_path: hub id or local directory, loaded strictly (missing or unexpected weights raise).
        config: instead, a dict with ``model_type`` (e.g. ``{"model_type": "bert", "hidden_size": 32, …}``)
            for a randomly initialised encoder.
        freeze: no gradients and eval mode kept (MetaLM freezes all but the last layers of a pretrained one).
        dtype: parameter dtype; ``None`` keeps the checkpoint's.
    """

    def __init__(self, name_or_path: str | None = None, config: dict | None = None, freeze: bool = False,
                 dtype: str | None = None) -> None:
        super().__init__()
        self.model = load_hf_model(AutoModel, name_or_path, config, parse_dtype(dtype))
        self.source = name_or_path
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):  # unused (last_hidden_state only): no grads, so DDP finds no unused weights
            pooler.requires_grad_(False)
        self.setup_freezing(freeze, dtype)

    def offline_args(self) -> dict[str, Any]:
        """Built from the model's own config (``config``), no ``name_or_path`` to read weights from."""
        return {"name_or_path": None, "config": config_kwargs(self.model.config)}

    @property
    def width(self) -> int:
        """D (``config.hidden_size``)."""
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        """V."""
        return self.model.get_input_embeddings().num_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids [K, L]``, ``attention_mask [K, L]`` → ``last_hidden_state [K, L, D]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the word embeddings (a frozen encoder stays frozen)."""
        self.model.resize_token_embeddings(vocab_size, mean_resizing=False)
        if self.frozen:
            freeze_(self)

    def save_pretrained(self, directory: str) -> None:
        """Write config and weights so ``HFTextEncoder(name_or_path=directory)`` reloads them."""
        self.model.save_pretrained(directory)
