"""Decoder-only Hugging Face LMs (GPT-2, OPT, Llama, …) behind the ``LanguageModel`` interface.

Shape legend: B batch, T text tokens, T_new generated tokens, D width, V vocabulary.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

from mmlm.attention_masks import packed_causal_mask, positions_from_mask, segment_positions
from mmlm.language.base import GenerationConfig, LMOutput
from mmlm.language.hf_base import HFLanguageModel

#: transformers' note on ``input_ids`` with pad tokens and no attention mask (``warn_if_padding_and_no_attention_mask``).
UNMASKED_PADDING_NOTE = "We strongly recommend passing in an `attention_mask`"


@contextmanager
def generating_quietly() -> Iterator[None]:
    """Hide transformers' "pass an attention_mask" note while ``generate`` runs with the mask mmlm gives.

    transformers' ``generate`` drops an attention mask of all ones (no row of the prompt is padded), then pads the
    rows that finished with the pad id and feeds those ids back without a mask, so GPT-2-like models note that the
    ids "may be padded" (seen in the quickstart's validation whenever a batch's prompts have one length). Nothing is
    wrong: the pad ids follow each row's end, and what follows them is discarded. For the call only, the logger that
    writes the note gets its own ``warning_once`` that drops this note and passes every other message on; the
    class's cached ``warning_once`` never sees it, so the note still shows once for a real unmasked call later."""
    log = logging.getLogger("transformers.modeling_utils")
    shown = log.warning_once  # transformers' (cached) method

    def warning_once(*args: object, **kwargs: object) -> None:
        if not (args and str(args[0]).startswith(UNMASKED_PADDING_NOTE)):
            shown(*args, **kwargs)

    log.warning_once = warning_once
    try:
        yield
    finally:
        del log.warning_once


class HFCausalLM(HFLanguageModel):
    """A decoder-only Hugging Face LM (GPT-2, OPT, Llama, …) via ``AutoModelForCausalLM``.

    Padding may be on either side for ``forward``; ``generate`` expects left padding. Position ids
    are derived from the attention mask, so a padded row gives the same result as the unpadded one.
    Arguments: see ``HFLanguageModel``.
    """

    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"

    def takes_position_ids(self) -> bool:
        """Whether the wrapped model's ``forward`` takes ``position_ids``."""
        return "position_ids" in inspect.signature(self.model.forward).parameters

    def _position_kwargs(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"position_ids": [B, T]}`` from the mask when the model's forward takes ``position_ids``."""
        if not self.takes_position_ids():
            return {}
        return {"position_ids": positions_from_mask(attention_mask)}

    #: ``forward`` takes ``segment_ids`` / ``position_ids`` of packed rows (a 4D block-diagonal causal mask).
    supports_packing = True

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced pass over ``inputs_embeds [B, T, D]`` with ``attention_mask [B, T]``.

        ``labels [B, T]`` are aligned with the inputs (shifted inside: position ``t`` predicts
        ``labels[:, t + 1]``), ``-100`` ignored. Returns ``logits [B, T, V]`` (computed when read) and the mean
        loss, whose head runs on the target positions only (:meth:`~HFLanguageModel.causal_output`). Packed rows
        give ``segment_ids [B, T]`` (1, 2, … per sample, 0 on padding): the model gets the block-diagonal causal
        mask ``[B, 1, T, T]`` (transformers takes a 4D mask as given) and positions restarting per sample
        (``position_ids [B, T]``, default from the segments), so each sample's logits equal its own row's
        (tested for GPT-2, OPT and Llama). A model whose forward takes no ``position_ids`` is refused.
        """
        embeds = inputs_embeds.to(self.dtype)
        if segment_ids is None:
            return self.causal_output(labels, inputs_embeds=embeds, attention_mask=attention_mask,
                                      **self._position_kwargs(attention_mask))
        if not self.takes_position_ids():
            raise ValueError(f"{type(self.model).__name__} takes no position_ids, so positions cannot restart in "
                             "packed rows: set data.init_args.pack=false")
        positions = segment_positions(segment_ids) if position_ids is None else position_ids
        return self.causal_output(labels, inputs_embeds=embeds, attention_mask=packed_causal_mask(segment_ids)[:, None],
                                  position_ids=positions)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig) -> torch.Tensor:
        """Greedy, sampled or beam search (KV cache) after left-padded ``inputs_embeds [B, T, D]``.

        Returns the new token ids ``[B, T_new]`` only, ``T_new <= config.max_new_tokens`` (shorter
        when every row ended with eos); rows that ended early are padded with the pad id. Runs in
        the current mode: call ``.eval()`` first unless dropout is wanted.
        """
        with generating_quietly():
            return self.model.generate(inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask,
                                       **self.generation_kwargs(config))
