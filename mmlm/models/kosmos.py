"""KOSMOS-1 (Huang et al. 2023, "Language Is Not All You Need"): a multimodal LLM over interleaved sentences.

image ─► encoder [I, N, Dv] ─► resampler [I, M, D] ─► fills each ``<image>`` + M × ``<image_embed>``
+ ``</image>`` span of the multimodal sentence ─► causal LM (the built-in Sub-LN decoder with xPos, or
any HF causal LM). Trained with the LM loss on text tokens only over interleaved documents,
image–caption pairs and text (``datamodules.interleaved``); packed rows keep attention inside each
sample. Zero- and k-shot evaluation generate from prompts with interleaved demonstrations.
Shape legend: B rows, I images in the batch, N image tokens, M latents per image, T tokens, D width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mmlm.batch import SentenceBatch
from mmlm.connectors import Resampler
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.fusion import output_tokens
from mmlm.language.base import LanguageModel
from mmlm.models.base import MultimodalModule, packing_arguments
from mmlm.sentences import Span, embed_sentence, kosmos_image_marker, placeholder_ids, special_tokens
from mmlm.tokenizers import load_tokenizer


class Kosmos1(MultimodalModule):
    """KOSMOS-1: vision encoder + resampler whose latents fill ``<image>`` spans of a causal LM's sentences.

    Args:
        encoder: the vision encoder (CLIP ViT-L/14 in the paper, frozen but for its last layer).
        language_model: the causal LM (``SubLNDecoder`` with ``position: xpos`` in the paper).
        tokenizer: hub id or local directory; ``<image>``, ``</image>`` and ``<image_embed>`` are added.
        connector: builds the connector from ``(encoder width, LM width)``; its output length is the
            number M of placeholders per image (the datamodule reads it from ``image_marker``).
        stop_strings: generated text is cut at the first of these (e.g. ``"."`` or ``"\\n"`` when the
            answer format of the demonstrations ends with it).
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, language_model: LanguageModel, tokenizer: str,
                 connector: Callable[[int, int], nn.Module] = Resampler, stop_strings: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder, self.language_model = encoder, language_model
        self.connector = connector(encoder.width, language_model.width)
        self.image_tokens = output_tokens(self.connector, encoder.num_tokens, encoder.width)
        self.image_marker = kosmos_image_marker(self.image_tokens)
        self.tokenizer = load_tokenizer(tokenizer, special_tokens([self.image_marker]))
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))
        self.placeholder_ids = placeholder_ids(self.tokenizer, [self.image_marker])
        self.stop_strings = tuple(stop_strings)
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())

    def data_spec(self) -> DataSpec:
        """The base's spec plus the image marker the sentences use."""
        return replace(super().data_spec(), markers=(self.image_marker,))

    # --- embeddings ----------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images [I, 3, H, W]`` → ``[I, M, D]`` in the LM's dtype (``I = 0`` gives an empty tensor)."""
        dtype = next(self.language_model.parameters()).dtype
        if images.shape[0] == 0:
            return torch.zeros(0, self.image_tokens, self.language_model.width, device=self.device, dtype=dtype)
        return self.connector(self.encoder(images)).to(dtype)

    def sentence_embeds(self, input_ids: torch.Tensor, spans: Sequence[Sequence[Span]],
                        images: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` with its image spans filled from ``images [I, 3, H, W]`` → ``[B, T, D]``."""
        return embed_sentence(self.language_model.embed, input_ids, spans, {"image": self.encode_images(images)},
                              self.placeholder_ids)

    # --- training ------------------------------------------------------------------------------
    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Mean cross-entropy over text tokens (labels ``-100`` on placeholders, wrappers, prompts, padding)."""
        embeds = self.sentence_embeds(batch.input_ids, batch.spans, batch.images)
        return self.language_model(embeds, batch.attention_mask, batch.labels,
                                   **packing_arguments(batch, self.language_model)).loss

    def training_step(self, batch: SentenceBatch, batch_idx: int) -> torch.Tensor:
        """The LM loss, plus the share of padding positions (``train/padding_fraction``)."""
        self.log("train/padding_fraction", batch.padding_fraction(), batch_size=len(batch))
        return super().training_step(batch, batch_idx)

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Continue each row's (k-shot) prompt; ``[]`` for batches without prompts (documents, text)."""
        if batch.prompt_ids is None:
            return []
        embeds = self.sentence_embeds(batch.prompt_ids, batch.prompt_spans, batch.images)
        texts = self.decode(self.language_model.generate(embeds, batch.prompt_mask, self.generation))
        return [self.cut(text) for text in texts]

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (stripped)."""
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()
