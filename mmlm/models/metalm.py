"""MetaLM (Hao et al. 2022, "Language Models are General-Purpose Interfaces"): bidirectional encoders
docked onto a causal decoder that serves as the universal task layer.

    [<image>×M] bos [task input (span)] target eos       (the sentence, built by the datamodule)
       │              │
    vision encoder  text encoder (bidirectional over the span)
    + connector     + connector
       └──── docked at their positions ───► causal decoder ─► target tokens (the only loss)

``MetaLM`` finetunes and prompts: the task input (the prompt, e.g. "Question: … Answer:") and the image
go through the encoders, the decoder generates the answer. ``MetaLMPretraining`` is the semi-causal
objective: random spans of the text (and, with a vision encoder, the image + a random text prefix) are
encoded and docked, the remaining tokens are predicted. See ``docs/metalm.md`` and ``mmlm/semicausal.py``.
Shape legend: B batch, M image embeddings, T text tokens, K spans, L span length, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from mmlm.batch import SentenceBatch
from mmlm.checkpointing import load_checkpoint_file
from mmlm.connectors import MLP
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.text import TextEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.fusion import output_tokens
from mmlm.language.base import LanguageModel
from mmlm.losses import IGNORE_INDEX
from mmlm.models.base import MultimodalModule
from mmlm.semicausal import dock, pack_spans, runs_to_span_ids, sample_prefix_spans, sample_spans, span_labels
from mmlm.sentences import Span, embed_sentence, prefix_image_marker
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer


class MetaLM(MultimodalModule):
    """A causal LM with docked bidirectional encoders, finetuned on (or prompted with) encoded task inputs.

    Args:
        language_model: the causal decoder (``SubLNDecoder`` or ``HFCausalLM``), the general-purpose interface.
        tokenizer: hub id or directory of the decoder's tokenizer (``<image>`` is added); the text encoder
            reads the same ids.
        vision_encoder: the bidirectional vision encoder (e.g. a timm ViT); ``None``: no image.
        text_encoder: the bidirectional text encoder of spans; ``None``: the task input stays causal text
            (the plain-decoder baseline when ``vision_encoder`` is ``None`` too).
        vision_connector: builds the image connector from ``(vision width, LM width)``.
        text_connector: builds the span connector from ``(text-encoder width, LM width)``.
        init_from: a Lightning checkpoint of a MetaLM/MetaLMPretraining whose weights start this module (strict).
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.

    Few-shot evaluation (paper §4.4: demonstrations ``[<image>] bos [encoded input] target eos`` before the query) is
    the datamodule's ``eval_shots``.
    """

    def __init__(self, language_model: LanguageModel, tokenizer: str, vision_encoder: VisionEncoder | None = None,
                 text_encoder: TextEncoder | None = None, vision_connector: Callable[[int, int], nn.Module] = MLP,
                 text_connector: Callable[[int, int], nn.Module] = MLP, init_from: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer, [IMAGE_TOKEN])
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # placeholders, never encoded text
        self.language_model, self.vision_encoder, self.text_encoder = language_model, vision_encoder, text_encoder
        for part in (language_model, text_encoder):
            if part is not None and len(self.tokenizer) > part.vocab_size:
                part.resize_token_embeddings(len(self.tokenizer))
        width = language_model.width
        self.vision_connector = None if vision_encoder is None else vision_connector(vision_encoder.width, width)
        self.text_connector = None if text_encoder is None else text_connector(text_encoder.width, width)
        self.image_marker = prefix_image_marker(0 if vision_encoder is None else output_tokens(
            self.vision_connector, vision_encoder.num_tokens, vision_encoder.width))
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())
        if init_from is not None:
            self.load_state_dict(load_checkpoint_file(init_from)["state_dict"])

    @property
    def image_preprocess(self) -> ImagePreprocess | None:
        """The vision encoder's size/mean/std (``None`` without one: the datamodule's ``image_size`` applies)."""
        return None if self.vision_encoder is None else self.vision_encoder.preprocess

    def data_spec(self) -> DataSpec:
        """The base's spec plus the image marker that starts every sentence (no image span without a vision
        encoder: text-only sentences)."""
        return replace(super().data_spec(), markers=(self.image_marker,))

    # --- docking ---------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` → docked image embeddings ``[B, M, D]`` (needs a vision encoder)."""
        return self.vision_connector(self.vision_encoder(pixels))

    def text_region(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: real text positions that may be encoded (not padding, image slots or bos)."""
        region = mask.bool() & (ids != self.image_token_id)
        return region if self.tokenizer.bos_token_id is None else region & (ids != self.tokenizer.bos_token_id)

    def input_spans(self, ids: torch.Tensor, mask: torch.Tensor, is_input: torch.Tensor) -> torch.Tensor:
        """``span_ids [B, T]``: each run of task-input tokens (``is_input``) is one span (none without a text encoder)."""
        if self.text_encoder is None:
            return torch.zeros_like(ids)
        return runs_to_span_ids(self.text_region(ids, mask) & is_input.bool())

    def docked_embeddings(self, ids: torch.Tensor, image_spans: list[list[Span]], span_ids: torch.Tensor,
                          batch: SentenceBatch) -> torch.Tensor:
        """Decoder inputs ``[B, T, D]``: token embeddings, the batch's images in their spans, encoded text spans
        (``span_ids``) at their positions."""
        images = {} if self.vision_encoder is None else {"image": self.encode_images(batch.images)}
        embeds = embed_sentence(self.language_model.embed, ids, image_spans, images, {"image": self.image_token_id})
        if not bool((span_ids > 0).any()):
            return embeds
        tokens, span_mask = pack_spans(ids, span_ids, self.tokenizer.pad_token_id)
        encoded = self.text_connector(self.text_encoder(tokens, span_mask))
        return dock(embeds, span_ids, encoded, span_mask)

    # --- training ------------------------------------------------------------------------------
    def targets(self, batch: SentenceBatch) -> torch.Tensor:
        """``labels [B, T]`` before docking: the batch's targets (image span, task input and padding ``-100``)."""
        return batch.labels

    def training_spans(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``span_ids [B, T]`` encoded in training: the task input (the prompt, whose labels are ``-100``)."""
        return self.input_spans(ids, mask, labels == IGNORE_INDEX)

    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Next-token loss on the causally predicted tokens only (span positions are ``-100``)."""
        labels = self.targets(batch)
        spans = self.training_spans(batch.input_ids, batch.attention_mask, labels)
        embeds = self.docked_embeddings(batch.input_ids, batch.spans, spans, batch)
        return self.language_model(embeds, batch.attention_mask, span_labels(labels, spans)).loss

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Encode image + task input of each (few-shot) prompt, then generate from the decoder; the demonstrations'
        answers (``prompt_labels``) stay causal."""
        ids, mask = batch.prompt_ids, batch.prompt_mask
        is_input = mask.bool() if batch.prompt_labels is None else mask.bool() & (batch.prompt_labels == IGNORE_INDEX)
        embeds = self.docked_embeddings(ids, batch.prompt_spans, self.input_spans(ids, mask, is_input), batch)
        return self.decode(self.language_model.generate(embeds, mask, self.generation))


class MetaLMPretraining(MetaLM):
    """Semi-causal language modelling: random spans are encoded bidirectionally and docked; every other
    real token is a target (loss only on the causally predicted tokens).

    Args:
        spans: ``"random"`` — up to ``max_spans`` spans of ``[min_span, max_span]`` tokens covering about
            ``span_ratio`` of the text (the paper's text corpora: 64–128 tokens, 25 %); ``"prefix"`` — one text
            prefix of random length (the paper's image-text pairs: image + prefix encoded, the rest predicted).
        span_ratio: fraction of each row's text to encode (``"random"``).
        min_span: shortest span (``"random"``).
        max_span: longest span (``"random"``).
        max_spans: spans per row at most (``"random"``).
        **kwargs: :class:`MetaLM` arguments (a ``text_encoder`` is required; without a ``vision_encoder`` the
            images of the batches are ignored: text-only pretraining on e.g. caption text).
    """

    def __init__(self, spans: Literal["random", "prefix"] = "random", span_ratio: float = 0.25, min_span: int = 1,
                 max_span: int = 4, max_spans: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.text_encoder is None:
            raise ValueError("MetaLMPretraining needs a text_encoder: semi-causal LM encodes spans of the text")
        if spans not in ("random", "prefix"):
            raise ValueError(f"MetaLMPretraining spans={spans!r}: expected 'random' or 'prefix'")
        self.spans, self.span_ratio = spans, span_ratio
        self.min_span, self.max_span, self.max_spans = min_span, max_span, max_spans

    def targets(self, batch: SentenceBatch) -> torch.Tensor:
        """Every real text token of ``bos prompt target eos`` is a target (image span and padding ``-100``)."""
        text = batch.attention_mask.bool() & (batch.input_ids != self.image_token_id)
        return batch.input_ids.masked_fill(~text, IGNORE_INDEX)

    def training_spans(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Random spans inside the text, never over its last real token (eos stays a target)."""
        last = mask.long().cumsum(1) == mask.sum(1, keepdim=True)
        region = self.text_region(ids, mask) & ~last
        if self.spans == "prefix":
            return sample_prefix_spans(region)
        return sample_spans(region, self.span_ratio, self.min_span, self.max_span, self.max_spans)
