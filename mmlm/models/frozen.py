"""Frozen (Tsimpoukelli et al. 2021): a trainable vision encoder steers a frozen language model.

image ─► encoder [B, N, Dv] ─► connector [B, k, D] ─► fills the image span of the frozen causal LM's sentence
(``<image>×k bos prompt target``, built by the datamodule) ─► caption/answer. The loss is on target tokens only.
Few-shot evaluation interleaves support images and texts in one multimodal sentence, built by the datamodule
(``eval_shots``). Shape legend: B batch, N image tokens, k prefix tokens, T text, D width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mmlm.batch import SentenceBatch
from mmlm.connectors import LinearPrefix
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.freezing import freeze_
from mmlm.fusion import output_tokens
from mmlm.language.base import LanguageModel
from mmlm.models.base import MultimodalModule, packing_arguments
from mmlm.sentences import Span, embed_sentence, placeholder_ids, prefix_image_marker
from mmlm.tokenizers import load_tokenizer


class Frozen(MultimodalModule):
    """Frozen: vision encoder + connector trained through an always-frozen causal LM.

    Args:
        encoder: the vision encoder (trainable in the paper: NF-ResNet-50).
        language_model: a causal LM adapter; Frozen freezes it whatever its own ``freeze`` says.
        tokenizer: hub id or local directory of the LM's tokenizer (``<image>`` is added).
        connector: builds the connector from ``(encoder width, LM width)``.
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.

    Few-shot evaluation (the paper's ``n``-shot prompts) is the datamodule's ``eval_shots``.
    """

    def __init__(self, encoder: VisionEncoder, language_model: LanguageModel, tokenizer: str,
                 connector: Callable[[int, int], nn.Module] = LinearPrefix, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder = encoder
        self.language_model = language_model
        self.connector = connector(encoder.width, language_model.width)
        self.image_marker = prefix_image_marker(output_tokens(self.connector, encoder.num_tokens, encoder.width))
        self.tokenizer = load_tokenizer(tokenizer, self.image_marker.tokens())
        self.placeholder_ids = placeholder_ids(self.tokenizer, [self.image_marker])
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))
        freeze_(language_model)
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())

    def data_spec(self) -> DataSpec:
        """The base's spec plus the image marker that starts every sentence."""
        return replace(super().data_spec(), markers=(self.image_marker,))

    def encode_images(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` (or the frozen encoder's cached ``features [B, N, Dv]``) → visual prefix
        ``[B, k, D]`` in the LM's dtype."""
        prefix = self.connector(self.encoder_tokens(pixels, features))
        return prefix.to(next(self.language_model.parameters()).dtype)

    def embed(self, ids: torch.Tensor, spans: Sequence[Sequence[Span]], batch: SentenceBatch) -> torch.Tensor:
        """``ids [B, T]`` with their image spans filled from the batch's images → ``[B, T, D]``."""
        images = {"image": self.encode_images(batch.images, batch.features)}
        return embed_sentence(self.language_model.embed, ids, spans, images, self.placeholder_ids)

    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Caption/answer cross-entropy with the image prefix; prompt and padding are ignored."""
        embeds = self.embed(batch.input_ids, batch.spans, batch)
        return self.language_model(embeds, batch.attention_mask, batch.labels,
                                   **packing_arguments(batch, self.language_model)).loss

    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Continue each example's (few-shot) prompt."""
        embeds = self.embed(batch.prompt_ids, batch.prompt_spans, batch)
        return self.decode(self.language_model.generate(embeds, batch.prompt_mask, self.generation))
