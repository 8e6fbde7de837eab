"""Text-only causal LM training: the first stage of the Frozen recipe on synthetic data.

Frozen needs a language model that already speaks the data's language before it is frozen.
For real data that is a pretrained GPT-2/OPT; for the synthetic quickstart it is a tiny LM
trained here on the same prompt + target texts, then exported with ``save_pretrained``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmlm.batch import SentenceBatch
from mmlm.data_spec import DataSpec
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.hub import sub_state
from mmlm.language.base import LanguageModel
from mmlm.models.base import MultimodalModule
from mmlm.sentences import prefix_image_marker
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer


class CausalLMPretraining(MultimodalModule):
    """Train a causal LM on the text of image-text batches (images are ignored).

    Every token of ``prompt + target + eos`` is a target. Validation logs ``val/loss`` and the
    generation metrics from the prompts, i.e. a text-only (blind) baseline.

    Args:
        language_model: the causal LM adapter to train.
        tokenizer: hub id or local directory (``<image>`` is added so later stages share ids).
        export_dir: where ``on_fit_end`` writes the LM and tokenizer (``save_pretrained``).
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, language_model: LanguageModel, tokenizer: str, export_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.language_model = language_model
        self.tokenizer = load_tokenizer(tokenizer, [IMAGE_TOKEN])
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))
        self.export_dir = export_dir
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())  # the blind-LM baseline

    def data_spec(self) -> DataSpec:
        """The base's spec with an image marker of no positions: text-only sentences, the same token layout as the
        prefix families' text."""
        return replace(super().data_spec(), markers=(prefix_image_marker(0),))

    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Next-token cross-entropy over all non-padding tokens of ``input_ids [B, T]``."""
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        embeds = self.language_model.embed(batch.input_ids)
        return self.language_model(embeds, batch.attention_mask, labels).loss

    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Continue each left-padded prompt ``prompt_ids [B, P]`` without looking at the image."""
        embeds = self.language_model.embed(batch.prompt_ids)
        new = self.language_model.generate(embeds, batch.prompt_mask, self.generation)
        return self.decode(new)

    def on_fit_end(self) -> None:
        """Export the trained LM and its tokenizer to ``export_dir`` (rank zero writes; every rank gathers sharded
        weights)."""
        if self.export_dir is None:
            return
        state = self.gathered_state_dict()
        if self.trainer.is_global_zero:
            Path(self.export_dir).mkdir(parents=True, exist_ok=True)
            self.language_model.save_pretrained(self.export_dir, sub_state(state, "language_model."))
            self.tokenizer.save_pretrained(self.export_dir)
