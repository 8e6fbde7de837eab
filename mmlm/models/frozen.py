"""Frozen (Tsimpoukelli et al. 2021): a trainable vision encoder steers a frozen language model.

image ─► encoder [B, N, Dv] ─► connector [B, k, D] ─► prefix of the frozen causal LM ─► caption/answer.
The loss is on target tokens only. Few-shot evaluation interleaves support images and texts
in one multimodal sentence. Shape legend: B batch, N image tokens, k prefix tokens, T text, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmlm.batch import Batch
from mmlm.connectors import LinearPrefix
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.fewshot import few_shot_rows
from mmlm.freezing import freeze_
from mmlm.fusion import embed_with_prefix, left_pad, splice
from mmlm.language.base import LanguageModel
from mmlm.models.base import MultimodalModule
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer


class Frozen(MultimodalModule):
    """Frozen: vision encoder + connector trained through an always-frozen causal LM.

    Args:
        encoder: the vision encoder (trainable in the paper: NF-ResNet-50).
        language_model: a causal LM adapter; Frozen freezes it whatever its own ``freeze`` says.
        tokenizer: hub id or local directory of the LM's tokenizer (``<image>`` is added).
        connector: builds the connector from ``(encoder width, LM width)``.
        eval_shots: support examples per query at evaluation (0 = zero-shot). Support examples
            are the next ``eval_shots`` examples of the same batch that show another image, with their
            targets, interleaved before the query as ``<image> prompt target <image> prompt``.
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, language_model: LanguageModel, tokenizer: str,
                 connector: Callable[[int, int], nn.Module] = LinearPrefix, eval_shots: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder = encoder
        self.language_model = language_model
        self.connector = connector(encoder.width, language_model.width)
        self.tokenizer = load_tokenizer(tokenizer, [IMAGE_TOKEN])
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))
        freeze_(language_model)
        self.eval_shots = eval_shots
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())

    def encode_images(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` (or the frozen encoder's cached ``features [B, N, Dv]``) → visual prefix
        ``[B, k, D]`` in the LM's dtype."""
        prefix = self.connector(self.encoder_tokens(pixels, features))
        return prefix.to(next(self.language_model.parameters()).dtype)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Caption/answer cross-entropy with the image prefix; prompt and padding are ignored."""
        prefix = self.encode_images(batch.pixels, batch.features)
        embeds, mask, labels = embed_with_prefix(self.language_model.embed, batch.input_ids, batch.attention_mask,
                                                 batch.labels, prefix, self.image_token_id)
        return self.language_model(embeds, mask, labels).loss

    @torch.no_grad()
    def generate_text(self, batch: Batch) -> list[str]:
        """Zero-shot (or ``eval_shots``-shot) generation from each example's prompt."""
        if self.eval_shots > 0:
            return self.generate_few_shot(batch, self.eval_shots)
        prefix = self.encode_images(batch.pixels, batch.features)
        embeds, mask, _ = embed_with_prefix(self.language_model.embed, batch.prompt_ids, batch.prompt_mask,
                                            None, prefix, self.image_token_id)
        return self.decode(self.language_model.generate(embeds, mask, self.generation))

    @torch.no_grad()
    def generate_few_shot(self, batch: Batch, shots: int) -> list[str]:
        """Interleave ``shots`` support examples before each query, in the training token layout
        (:func:`mmlm.fewshot.few_shot_rows`: the next examples of the batch that show another image)."""
        prefix = self.encode_images(batch.pixels, batch.features)
        rows = few_shot_rows(batch, shots, prefix.shape[1], self.image_token_id)
        ids, mask = left_pad(rows.ids, self.tokenizer.pad_token_id)
        images = prefix[torch.tensor(rows.images, device=prefix.device)]
        embeds = splice(self.language_model.embed(ids), ids, self.image_token_id, images)
        return self.decode(self.language_model.generate(embeds, mask, self.generation))
