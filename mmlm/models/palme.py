"""PaLM-E (Driess et al. 2023): multimodal sentences whose named spans each modality's encoder fills.

``Q: What happened between <img1> and <img2>? State: <state> A:`` — every marker becomes a span of
placeholders (:mod:`mmlm.sentences`), filled by its modality's encoder before the causal LM reads the
sentence::

    <imgK>  pixels [I, 3, H, W] ─► ViT/CNN [I, N, Dv] ─► affine/MLP ─► [I, N, D]   (N tokens per image)
    <state> state  [S, Ds]      ─► MLP ─► [S, k, D]                             (k tokens per state)
    <objK>  object [O, Do]      ─► MLP ─► [O, 1, D]                             (one token per object)

The LM is frozen or finetuned by its own ``freeze`` argument; the loss is on target tokens only.
Evaluation generates from the prompt: VQA accuracy for ``vqa`` rows, plan exact match and per-step
accuracy for ``plan`` rows. Shape legend: B batch, T text tokens, D LM width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mmlm.batch import SentenceBatch
from mmlm.connectors import MLP
from mmlm.connectors.state import ObjectTokens, StateTokens
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator, PlanScorer, VQAScorer
from mmlm.fusion import output_tokens
from mmlm.language.base import LanguageModel
from mmlm.models.base import MultimodalModule, packing_arguments
from mmlm.sentences import Marker, embed_sentence, placeholder_ids, special_tokens
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

STATE_TOKEN, OBJECT_TOKEN = "<state_embed>", "<obj_embed>"


def palme_markers(image_tokens: int, state_tokens: int) -> list[Marker]:
    """``<img1>``, ``<img2>``, … (N image tokens each), ``<state>`` (k tokens), ``<obj1>``, … (one token each)."""
    return [Marker("<img{}>", "image", image_tokens, IMAGE_TOKEN),
            Marker("<state>", "state", state_tokens, STATE_TOKEN),
            Marker("<obj{}>", "object", 1, OBJECT_TOKEN)]


class PaLME(MultimodalModule):
    """PaLM-E: image, state and object encoders write into spans of a causal LM's sentence.

    Args:
        encoder: the vision encoder (``[I, 3, H, W] → [I, N, Dv]``).
        language_model: a causal LM adapter; ``freeze`` in its own arguments chooses frozen or finetuned.
        tokenizer: hub id or directory of the LM's tokenizer (the markers' tokens are added).
        state_dim: Ds, width of a ``<state>`` vector.
        object_dim: Do, width of an ``<obj>`` vector.
        image_connector: builds ``[I, N, Dv] → [I, N', D]`` from ``(Dv, D)`` (PaLM-E: affine or MLP).
        state_connector: builds ``[S, Ds] → [S, k, D]`` from ``(Ds, D)``.
        object_connector: builds ``[O, Do] → [O, 1, D]`` from ``(Do, D)``.
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, language_model: LanguageModel, tokenizer: str, state_dim: int,
                 object_dim: int, image_connector: Callable[[int, int], nn.Module] = MLP,
                 state_connector: Callable[[int, int], nn.Module] = StateTokens,
                 object_connector: Callable[[int, int], nn.Module] = ObjectTokens, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder, self.language_model = encoder, language_model
        self.state_dim, self.object_dim = state_dim, object_dim
        width = language_model.width
        self.image_connector = image_connector(encoder.width, width)
        self.state_connector = state_connector(state_dim, width)
        self.object_connector = object_connector(object_dim, width)
        self.markers = palme_markers(output_tokens(self.image_connector, encoder.num_tokens, encoder.width),
                                     output_tokens(self.state_connector, state_dim))
        self.tokenizer = load_tokenizer(tokenizer, special_tokens(self.markers))
        self.placeholder_ids = placeholder_ids(self.tokenizer, self.markers)
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))  # a frozen LM stays frozen
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator([VQAScorer(), PlanScorer()]))

    # --- modality embeddings ---------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        """The base's spec plus the sentence markers and the state and object widths."""
        return replace(super().data_spec(), markers=tuple(self.markers), state_dim=self.state_dim,
                       object_dim=self.object_dim)

    def modality_embeddings(self, batch: SentenceBatch) -> dict[str, torch.Tensor]:
        """Each present modality's items → ``[K, M, D]`` in the LM's dtype (``image``, ``state``, ``object``)."""
        inputs = batch.inputs()
        encoders = {"image": lambda x: self.image_connector(self.encoder(x)), "state": self.state_connector,
                    "object": self.object_connector}
        unknown = set(inputs) - set(encoders)
        if unknown:
            raise ValueError(f"PaLME: the batch holds modalities {sorted(unknown)} without an encoder "
                             f"(known: {sorted(encoders)})")
        dtype = next(self.language_model.parameters()).dtype
        return {name: encoders[name](items).to(dtype) for name, items in inputs.items() if items.shape[0] > 0}

    def sentence_embeddings(self, ids: torch.Tensor, spans: list[list], embeds: dict[str, torch.Tensor]
                            ) -> torch.Tensor:
        """``ids [B, T]`` → ``[B, T, D]`` with every span filled from ``embeds`` (count-checked)."""
        return embed_sentence(self.language_model.embed, ids, spans, embeds, self.placeholder_ids)

    # --- training and generation -----------------------------------------------------------------
    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Cross-entropy on target tokens of the multimodal sentences (prompts, spans and padding ignored)."""
        embeds = self.sentence_embeddings(batch.input_ids, batch.spans, self.modality_embeddings(batch))
        return self.language_model(embeds, batch.attention_mask, batch.labels,
                                   **packing_arguments(batch, self.language_model)).loss

    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Answer or plan generated after each row's left-padded prompt."""
        if batch.prompt_ids is None:
            raise ValueError("PaLME.generate_text needs prompt_ids (an evaluation batch)")
        embeds = self.sentence_embeddings(batch.prompt_ids, batch.prompt_spans, self.modality_embeddings(batch))
        return self.decode(self.language_model.generate(embeds, batch.prompt_mask, self.generation))
