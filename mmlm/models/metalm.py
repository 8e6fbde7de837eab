"""MetaLM (Hao et al. 2022, "Language Models are General-Purpose Interfaces"): bidirectional encoders
docked onto a causal decoder that serves as the universal task layer.

    [<image>×M] bos [task input (span)] target eos
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
from typing import Any, Literal

import torch
from torch import nn

from mmlm.batch import Batch
from mmlm.checkpointing import load_checkpoint_file
from mmlm.connectors import MLP
from mmlm.encoders.base import ImagePreprocess, VisionEncoder
from mmlm.encoders.text import TextEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.fewshot import few_shot_rows
from mmlm.fusion import left_pad, prepend_placeholders, splice
from mmlm.language.base import LanguageModel
from mmlm.losses import IGNORE_INDEX
from mmlm.models.base import MultimodalModule
from mmlm.semicausal import dock, pack_spans, runs_to_span_ids, sample_prefix_spans, sample_spans, span_labels
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
        eval_shots: support examples per query at evaluation (0 = zero-shot); each is
            ``[<image>] bos [encoded input] target eos`` before the query (the next examples of the batch
            that show another image).
        init_from: a Lightning checkpoint of a MetaLM/MetaLMPretraining whose weights start this module (strict).
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, language_model: LanguageModel, tokenizer: str, vision_encoder: VisionEncoder | None = None,
                 text_encoder: TextEncoder | None = None, vision_connector: Callable[[int, int], nn.Module] = MLP,
                 text_connector: Callable[[int, int], nn.Module] = MLP, eval_shots: int = 0,
                 init_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer, [IMAGE_TOKEN])
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.language_model, self.vision_encoder, self.text_encoder = language_model, vision_encoder, text_encoder
        for part in (language_model, text_encoder):
            if part is not None and len(self.tokenizer) > part.vocab_size:
                part.resize_token_embeddings(len(self.tokenizer))
        width = language_model.width
        self.vision_connector = None if vision_encoder is None else vision_connector(vision_encoder.width, width)
        self.text_connector = None if text_encoder is None else text_connector(text_encoder.width, width)
        self.eval_shots = eval_shots
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())
        if init_from is not None:
            self.load_state_dict(load_checkpoint_file(init_from)["state_dict"])

    @property
    def image_preprocess(self) -> ImagePreprocess | None:
        """The vision encoder's size/mean/std (``None`` without one: the datamodule's ``image_size`` applies)."""
        return None if self.vision_encoder is None else self.vision_encoder.preprocess

    # --- docking ---------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """``pixels [B, 3, H, W]`` → docked image embeddings ``[B, M, D]`` (``None`` without a vision encoder)."""
        return None if self.vision_encoder is None else self.vision_connector(self.vision_encoder(pixels))

    def with_image_slots(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None,
                         images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Put ``M`` ``<image>`` slots in front of ``ids [B, T]`` (left padding stays left) → ``[B, M+T]``."""
        if images is None:
            return ids, mask, labels
        return prepend_placeholders(ids, mask, self.image_token_id, images.shape[1], labels)

    def text_region(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: real text positions that may be encoded (not padding, image slots or bos)."""
        region = mask.bool() & (ids != self.image_token_id)
        return region if self.tokenizer.bos_token_id is None else region & (ids != self.tokenizer.bos_token_id)

    def input_spans(self, ids: torch.Tensor, mask: torch.Tensor, is_input: torch.Tensor) -> torch.Tensor:
        """``span_ids [B, T]``: each run of task-input tokens (``is_input``) is one span (none without a text encoder)."""
        if self.text_encoder is None:
            return torch.zeros_like(ids)
        return runs_to_span_ids(self.text_region(ids, mask) & is_input.bool())

    def docked_embeddings(self, ids: torch.Tensor, span_ids: torch.Tensor,
                          images: torch.Tensor | None) -> torch.Tensor:
        """Decoder inputs ``[B, T, D]``: token embeddings, images at ``<image>`` slots, encoded spans at their positions."""
        embeds = self.language_model.embed(ids)
        if images is not None:
            embeds = splice(embeds, ids, self.image_token_id, images)
        if not bool((span_ids > 0).any()):
            return embeds
        tokens, span_mask = pack_spans(ids, span_ids, self.tokenizer.pad_token_id)
        encoded = self.text_connector(self.text_encoder(tokens, span_mask))
        return dock(embeds, span_ids, encoded, span_mask)

    # --- training ------------------------------------------------------------------------------
    def targets(self, batch: Batch) -> torch.Tensor:
        """``labels [B, T]`` before docking: the batch's targets (task input and padding ``-100``)."""
        return batch.labels

    def training_spans(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``span_ids [B, T]`` encoded in training: the task input (the prompt, whose labels are ``-100``)."""
        return self.input_spans(ids, mask, labels == IGNORE_INDEX)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Next-token loss on the causally predicted tokens only (span positions are ``-100``)."""
        images = self.encode_images(batch.pixels)
        ids, mask, labels = self.with_image_slots(batch.input_ids, batch.attention_mask, self.targets(batch), images)
        spans = self.training_spans(ids, mask, labels)
        embeds = self.docked_embeddings(ids, spans, images)
        return self.language_model(embeds, mask, span_labels(labels, spans)).loss

    # --- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(self, batch: Batch) -> list[str]:
        """Encode image + prompt, then generate from the decoder (``eval_shots`` support examples first)."""
        if self.eval_shots > 0:
            return self.generate_few_shot(batch, self.eval_shots)
        images = self.encode_images(batch.pixels)
        ids, mask, _ = self.with_image_slots(batch.prompt_ids, batch.prompt_mask, None, images)
        embeds = self.docked_embeddings(ids, self.input_spans(ids, mask, mask), images)
        return self.decode(self.language_model.generate(embeds, mask, self.generation))

    @torch.no_grad()
    def generate_few_shot(self, batch: Batch, shots: int) -> list[str]:
        """In-context learning: ``shots`` encoded demonstrations (image, input span, causal answer) before each query."""
        images = self.encode_images(batch.pixels)
        slots = images.shape[1] if images is not None else 0
        rows = few_shot_rows(batch, shots, slots, self.image_token_id)
        ids, mask = left_pad(rows.ids, self.tokenizer.pad_token_id)
        is_input, _ = left_pad([flag.long() for flag in rows.is_input], 0)
        spans = self.input_spans(ids, mask, is_input)
        picked = None if images is None else images[torch.tensor(rows.images, device=images.device)]
        embeds = self.docked_embeddings(ids, spans, picked)
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

    def targets(self, batch: Batch) -> torch.Tensor:
        """Every real token of ``prompt + target + eos`` is a target (padding ``-100``)."""
        return batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)

    def training_spans(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Random spans inside the text, never over its last real token (eos stays a target)."""
        last = mask.long().cumsum(1) == mask.sum(1, keepdim=True)
        region = self.text_region(ids, mask) & ~last
        if self.spans == "prefix":
            return sample_prefix_spans(region)
        return sample_spans(region, self.span_ratio, self.min_span, self.max_span, self.max_spans)
