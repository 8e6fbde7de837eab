"""The one interface every language model adapter implements.

Shape legend: B batch, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from mmlm.freezing import Freezable


@dataclass
class LMOutput:
    """What a language model adapter returns from ``forward``.

    Attributes:
        loss: scalar mean cross-entropy over labels ``!= -100`` (``None`` without labels).
        logits: ``[B, T, V]`` (decoder positions for seq2seq).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings shared by every generator (saved next to predictions).

    Attributes:
        max_new_tokens: tokens generated after the prompt.
        num_beams: 1 is greedy search.
        length_penalty: beam-search length penalty (exponent on length).
        min_new_tokens: tokens generated before eos is allowed.
        repetition_penalty: 1.0 disables it.
    """

    max_new_tokens: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0


class LanguageModel(Freezable):
    """Adapter over a language model that consumes ``inputs_embeds``.

    Implementations set ``width`` (D) and ``vocab_size`` (V) and call ``setup_freezing`` last.
    """

    width: int
    vocab_size: int

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` → ``embeddings [B, T, D]`` (the LM's input embedding table)."""

    @abstractmethod
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced pass: ``inputs_embeds [B, T, D]``, ``attention_mask [B, T]``, ``labels [B, T]``."""

    @abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig) -> torch.Tensor:
        """Decode from ``inputs_embeds [B, T, D]`` (left-padded) → new token ids ``[B, T_new]`` only."""

    @abstractmethod
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the embedding table (and tied output head) to ``vocab_size`` rows."""
