"""Hugging Face encoder-decoder LMs (T5, BART, …) behind the ``LanguageModel`` interface.

``inputs_embeds`` feed the encoder; ``labels`` are the decoder targets.
Shape legend: B batch, T encoder tokens, T' decoder tokens, T_new generated tokens, D width, V vocabulary.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM

from mmlm.language.base import GenerationConfig, LMOutput
from mmlm.language.hf_base import HFLanguageModel
from mmlm.losses import token_cross_entropy


def real_tokens_first(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row so its real tokens come first, in order, and padding last (right padding).

    ``inputs_embeds [B, T, D]``, ``attention_mask [B, T]`` → the same shapes. Encoders with absolute
    positions (BART) then see a left-padded row exactly as the unpadded one; the decoder's
    cross-attention does not depend on where the encoder's padding sits.
    """
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
    embeds = inputs_embeds.gather(1, order.unsqueeze(-1).expand_as(inputs_embeds))
    return embeds, attention_mask.gather(1, order)


class HFSeq2SeqLM(HFLanguageModel):
    """An encoder-decoder Hugging Face LM via ``AutoModelForSeq2SeqLM``.

    Arguments: see ``HFLanguageModel``. A ``config`` dict must give a ``decoder_start_token_id``
    (T5 uses its pad id 0; BART's default is its eos id 2). Known limit of transformers 5:
    BART/MBart with ``decoder_layers != encoder_layers`` break the generation cache (IndexError
    in ``cache_utils``); keep them equal.

    Raises:
        ValueError: the model has no decoder start token.
    """

    auto_class = AutoModelForSeq2SeqLM
    peft_task_type = "SEQ_2_SEQ_LM"

    def check_model(self) -> None:
        """Raise ``ValueError`` when the model has no decoder start token."""
        if getattr(self.model.config, "decoder_start_token_id", None) is None:
            raise ValueError(f"{self.model.config.model_type} model has no decoder_start_token_id; "
                             "set 'decoder_start_token_id' in the config dict (T5: the pad id 0)")

    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels [B, T']`` → decoder input ids ``[B, T']``: start token, then labels shifted right (-100 → pad)."""
        return self.model.prepare_decoder_input_ids_from_labels(labels=labels)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> LMOutput:
        """Encode ``inputs_embeds [B, T, D]`` (``attention_mask [B, T]``, any padding side), decode ``labels [B, T']``.

        Teacher forcing: decoder position ``t`` predicts ``labels[:, t]``; ``-100`` is ignored in the
        mean loss. Returns decoder ``logits [B, T', V]``.

        Raises:
            ValueError: ``labels`` is ``None`` (the decoder needs its targets).
        """
        if labels is None:
            raise ValueError("HFSeq2SeqLM.forward needs labels (decoder targets [B, T'], -100 ignored)")
        embeds, mask = real_tokens_first(inputs_embeds.to(self.dtype), attention_mask)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=self.decoder_inputs(labels),
                         use_cache=False)
        return LMOutput(loss=token_cross_entropy(out.logits, labels), logits=out.logits)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig) -> torch.Tensor:
        """Greedy, sampled or beam search from encoder ``inputs_embeds [B, T, D]`` (any padding side).

        Returns the decoder tokens ``[B, T_new]`` without the decoder start token, ``T_new <=
        config.max_new_tokens``; rows that ended early are padded with the pad id. Runs in the
        current mode: call ``.eval()`` first unless dropout is wanted.
        """
        embeds, mask = real_tokens_first(inputs_embeds.to(self.dtype), attention_mask)
        ids = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **self.generation_kwargs(config))
        return ids[:, 1:]
