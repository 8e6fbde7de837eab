"""The one interface every language model adapter implements.

Shape legend: B batch, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from mmlm.freezing import Freezable, freeze_
from mmlm.lora import LoRA, add_lora, lora_modules, merge_lora_


class LMOutput:
    """What a language model adapter returns from ``forward``.

    An adapter computes the loss from the logits of the target positions only
    (:func:`mmlm.losses.causal_head_loss`) and hands over the head and its input instead of full logits: ``logits``
    are then computed on first read (once, under the grad mode and autocast settings of the forward pass), so a
    training step that reads only ``loss`` never holds ``[B, T, V]`` logits, and a caller that reads ``logits``
    (scoring, parity checks) gets the full ones.

    Args:
        loss: scalar mean cross-entropy over labels ``!= -100`` (``None`` without labels).
        logits: ``[B, T, V]`` computed logits; or ``None`` with ``hidden`` and ``head``.
        hidden: ``[B, T, D]`` what ``head`` reads, for logits computed on first read.
        head: maps ``hidden`` to ``logits [B, T, V]`` (the LM's output head, a final norm included).

    Attributes:
        loss: as given.
        logits: ``[B, T, V]`` (decoder positions for seq2seq).

    Raises:
        ValueError: neither ``logits`` nor both ``hidden`` and ``head``.
    """

    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None, head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if logits is None and (hidden is None or head is None):
            raise ValueError("LMOutput needs logits, or hidden and head to compute them from")
        self.loss, self._logits, self._hidden, self._head = loss, logits, hidden, head
        if logits is None:
            kind = hidden.device.type
            self._modes = (torch.is_grad_enabled(), kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    @property
    def logits(self) -> torch.Tensor:
        """``[B, T, V]``, computed from ``hidden`` on first read when the adapter deferred them."""
        if self._logits is None:
            grad, kind, autocast, dtype = self._modes
            with torch.set_grad_enabled(grad), torch.autocast(kind, dtype=dtype, enabled=autocast):
                self._logits = self._head(self._hidden)
            self._hidden = self._head = None
        return self._logits


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings shared by every generator (saved next to predictions).

    The defaults decode greedily. ``do_sample=True`` draws each token from the model's distribution after
    ``temperature``, then ``top_k``, then ``top_p`` (transformers' order), one hypothesis per row. The draws use
    torch's global random generator: ``seed_everything`` (the config's ``seed_everything:``) makes a run
    reproducible for the same world size and batch order; every rank gets the same seed, which is harmless
    because the ranks decode different prompts.

    Attributes:
        max_new_tokens: tokens generated after the prompt.
        num_beams: 1 is greedy search (or sampling); more is beam search, which cannot sample.
        length_penalty: beam-search length penalty (exponent on length).
        min_new_tokens: tokens generated before eos is allowed.
        repetition_penalty: 1.0 disables it.
        do_sample: sample each token instead of taking the most likely one.
        temperature: logits are divided by it before sampling (> 0; 1.0 leaves them as they are).
        top_k: sample among the ``top_k`` most likely tokens only (0 keeps every token).
        top_p: sample among the most likely tokens whose probabilities add up to ``top_p`` (nucleus sampling,
            in ``(0, 1]``; 1.0 keeps every token).

    Raises:
        ValueError: a setting outside its range, a sampling setting without ``do_sample`` (it would be
            ignored), or ``do_sample`` with ``num_beams > 1``; the message names the field.
    """

    max_new_tokens: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if (problem := sampling_problem(self)) is not None:
            raise ValueError(f"GenerationConfig: {problem}")

    @property
    def sampling_settings(self) -> dict[str, float]:
        """The :data:`SAMPLING_FIELDS` that differ from their default (which leaves the distribution as it is)."""
        defaults = {field.name: field.default for field in fields(self)}
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) != defaults[name]}


#: The settings that only act when :attr:`GenerationConfig.do_sample` is true.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p")


def sampling_problem(config: GenerationConfig) -> str | None:
    """Why the sampling settings of ``config`` cannot be used as given (naming the field), else ``None``."""
    if not config.temperature > 0:
        return f"temperature={config.temperature} must be > 0 (the logits are divided by it)"
    if config.top_k < 0:
        return f"top_k={config.top_k} must be >= 0 (0 keeps every token)"
    if not 0 < config.top_p <= 1:
        return f"top_p={config.top_p} must be in (0, 1] (1.0 keeps every token)"
    if config.do_sample and config.num_beams > 1:
        return f"do_sample=True with num_beams={config.num_beams}: sampling draws one hypothesis per row; set num_beams: 1"
    if not config.do_sample and config.sampling_settings:
        named = ", ".join(f"{k}={v}" for k, v in config.sampling_settings.items())
        return (f"{named}: sampling settings have no effect unless do_sample is true "
                "(set do_sample: true, or leave them at their defaults)")
    return None


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling filters on ``logits [B, V]``: divide by ``temperature``, then keep the ``top_k`` largest (ties
    kept), then the smallest set of most likely tokens whose probability reaches ``top_p``; every removed token
    gets ``-inf``. Neutral values (1.0, 0, 1.0) skip their step. The most likely token is always kept."""
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(outside_nucleus(logits, top_p), float("-inf"))
    return logits


def outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[B, V]`` True where a token lies outside the nucleus: the probability of the tokens more likely than it
    already reaches ``top_p``."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)


def next_tokens(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """``logits [B, V]`` → token ids ``[B]``: the most likely one, or with ``config.do_sample`` a draw (global
    torch generator) from the distribution left by :func:`filter_logits`."""
    if not config.do_sample:
        return logits.argmax(-1)
    kept = filter_logits(logits.float(), config.temperature, config.top_k, config.top_p)
    return torch.multinomial(kept.softmax(-1), num_samples=1).squeeze(-1)


class LanguageModel(Freezable):
    """Adapter over a language model that consumes ``inputs_embeds``.

    Implementations set ``width`` (D) and ``vocab_size`` (V), call ``setup_freezing`` and then, with LoRA settings,
    :meth:`add_lora` last. They name the module LoRA goes into (:meth:`lora_root`) and its default targets
    (:meth:`lora_targets`).

    Attributes:
        lora: the LoRA settings when the LM has adapters (its base is then frozen), else ``None``.
        peft_task_type: peft's ``task_type`` of the LM (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``; ``None`` for a custom
            module), written into exported adapter configs.
    """

    width: int
    vocab_size: int
    lora: LoRA | None = None
    peft_task_type: str | None = None

    def lora_root(self) -> nn.Module:
        """The module whose layers LoRA adapts (a transformers model, or the adapter itself)."""
        return self

    def lora_targets(self) -> list[str]:
        """Names of the layers LoRA adapts when ``lora.target_modules`` is ``None`` (the attention projections)."""
        raise NotImplementedError(f"{type(self).__name__} has no default LoRA targets; set lora.target_modules")

    def add_lora(self, lora: LoRA) -> None:
        """Freeze the base weights and add LoRA adapters (:func:`mmlm.lora.add_lora`); only the adapters train."""
        add_lora(self.lora_root(), lora, lora.target_modules or self.lora_targets())
        self.lora = lora
        freeze_(self)

    def adapters(self) -> list[nn.Module]:
        """The LoRA matrices and dropouts (trainable while the base is frozen); ``[]`` without LoRA."""
        return lora_modules(self.lora_root()) if self.lora is not None else []

    def merge_lora(self) -> None:
        """Add the LoRA updates into the base weights and drop the adapters (in place; for export)."""
        if self.lora is not None:
            merge_lora_(self.lora_root())
            self.lora = None

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
