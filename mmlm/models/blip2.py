"""BLIP-2 stage 2 (Li et al. 2023): a frozen ViT and a frozen LM bridged by a trained Q-Former.

image ─► frozen encoder [B, N, Dv] ─► Q-Former queries [B, M, H] ─► language_projection [B, M, D] ─► soft prompt,
which fills the image span that starts every sentence (``<image>×M bos? prompt target``, built by the datamodule):

* decoder-only LM (OPT-like): ``[soft prompt; prompt; target]`` through the LM, loss on the target only;
* encoder-decoder LM (T5-like, prefix LM): the encoder reads the prompt sentence ``[soft prompt; prompt]``, the
  decoder predicts the target.

One class serves both; the kind comes from the LM adapter's type (:func:`is_seq2seq`). Per-part
precision as in BLIP-2: the Q-Former, queries and projection stay fp32, the encoder and the LM keep their
own ``dtype``; tensors are cast where they cross. Weight import/export of transformers'
``Blip2ForConditionalGeneration``: :meth:`Blip2.from_hf`, :meth:`Blip2.to_hf` (:mod:`mmlm.convert.blip2_hf`).

Shape legend: B batch, N image tokens, M queries, H Q-Former width, T text, T' target tokens, D LM width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from mmlm.batch import SentenceBatch
from mmlm.connectors.qformer import QFormer, QFormerConfig
from mmlm.convert.blip2_hf import blip2_from_hf, blip2_to_hf
from mmlm.data_spec import DataSpec
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, GenerationEvaluator, LossEvaluator
from mmlm.freezing import freeze_
from mmlm.fusion import targets_only
from mmlm.language.base import LanguageModel, LMOutput
from mmlm.language.hf_seq2seq import HFSeq2SeqLM
from mmlm.lora import LoRA
from mmlm.models.base import ModuleSettings, MultimodalModule, packing_arguments
from mmlm.sentences import Span, embed_sentence, placeholder_ids, prefix_image_marker
from mmlm.sizes import part_kwargs
from mmlm.tokenizers import load_tokenizer


def unfreeze_(encoder: VisionEncoder) -> VisionEncoder:
    """Make every parameter of ``encoder`` that its forward uses trainable and let it follow train/eval mode (in
    place); :meth:`~mmlm.encoders.base.VisionEncoder.unused_parameters` stay frozen."""
    encoder.frozen = False
    encoder.requires_grad_(True)
    for param in encoder.unused_parameters():
        param.requires_grad_(False)
    return encoder


def is_seq2seq(language_model: LanguageModel) -> bool:
    """Whether the LM is an encoder-decoder (prefix-LM layout) rather than decoder-only."""
    return isinstance(language_model, HFSeq2SeqLM)


def check_token_id(token_id: int, tokenizer: Any) -> int:
    """``token_id``, or a ``ValueError`` naming it when it is not one of ``tokenizer``'s ids."""
    if not 0 <= token_id < len(tokenizer):
        raise ValueError(f"Blip2: end_token_id={token_id} is not an id of the tokenizer ({len(tokenizer)} ids)")
    return token_id


def instruction_tokenizer(qformer_text_input: bool, name_or_path: str | None) -> Any:
    """The Q-Former's tokenizer for instruction-aware queries, or ``None`` without them.

    Raises:
        ValueError: ``qformer_text_input`` without ``qformer_tokenizer`` or the other way round.
    """
    if qformer_text_input != (name_or_path is not None):
        raise ValueError("Blip2: qformer_text_input=true needs qformer_tokenizer=<the Q-Former's BERT tokenizer>, and "
                         f"qformer_tokenizer is read only then (got qformer_text_input={qformer_text_input}, "
                         f"qformer_tokenizer={name_or_path!r})")
    return None if name_or_path is None else load_tokenizer(name_or_path)


def check_instruction_vocab(tokenizer: Any, rows: int, name_or_path: str | None) -> None:
    """Raise ``ValueError`` when ``tokenizer`` has more ids than the Q-Former's ``rows`` word embeddings (both named)."""
    if len(tokenizer) > rows:
        raise ValueError(f"Blip2: qformer_tokenizer {name_or_path!r} has {len(tokenizer)} ids but the Q-Former's word "
                         f"table has {rows} rows (qformer.vocab_size)")


def stop_generation_at(language_model: LanguageModel, token_id: int) -> None:
    """Make ``token_id`` the eos of the LM's transformers generation config (where ``generate`` stops).

    Raises:
        TypeError: the LM is not a transformers adapter (it has no ``model.generation_config``).
    """
    config = getattr(getattr(language_model, "model", None), "generation_config", None)
    if config is None:
        raise TypeError(f"Blip2: end_token_id needs a transformers LM adapter (HFCausalLM, HFSeq2SeqLM), got "
                        f"{type(language_model).__name__}")
    config.eos_token_id = token_id


class Blip2(MultimodalModule):
    """BLIP-2 stage 2: Q-Former soft prompt for a frozen causal or seq2seq LM.

    Args:
        encoder: the vision encoder; frozen here whatever its own ``freeze`` says (as in BLIP-2), except the blocks its
            ``trainable_blocks`` keeps training, unless ``train_encoder``.
        language_model: an ``HFCausalLM`` (soft prompt before the text) or ``HFSeq2SeqLM`` (prefix LM);
            frozen here.
        tokenizer: hub id or local directory of the LM's tokenizer (``<image>`` is added as the
            placeholder of the soft prompt; the LM's table grows if needed).
        num_query_tokens: M.
        qformer: the Q-Former's size (:class:`~mmlm.connectors.QFormerConfig`: ``hidden_size``,
            ``num_layers``, ``num_heads``, ``intermediate_size``, ``cross_attention_freq``, ``layer_norm_eps``,
            ``dropout``, ``vocab_size``…); it reads ``encoder.width`` and has a text side only with
            ``qformer_text_input``.
        train_encoder: the whole encoder trains (LAVIS's ``freeze_vit: False`` of its caption finetuning), in train
            mode, whatever its own ``freeze`` says; keep its weights in float32 then (``vision_dtype``).
        end_token_id: the token that ends every target and stops generation (LAVIS's OPT models end text with
            ``"\\n"``); ``None``: the tokenizer's eos for targets, the LM's own generation config to stop.
        qformer_text_input: instruction-aware queries (BLIP-2's VQA finetuning, InstructBLIP's
            ``qformer_text_input``): each example's prompt, in ``qformer_tokenizer``, joins the queries in the
            Q-Former's self-attention (bidirectional; only the queries read the image and reach the LM). ``False``:
            a queries-only Q-Former, as BLIP-2's pretraining and zero-shot evaluation.
        qformer_tokenizer: hub id or directory of the Q-Former's text tokenizer (BERT's, ``bert-base-uncased`` in
            BLIP-2); needed with ``qformer_text_input`` and only then. The Q-Former's word table has as many rows as
            it has ids unless ``qformer.vocab_size`` says otherwise.
        **kwargs: optimisation and evaluation settings of :class:`MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, language_model: LanguageModel, tokenizer: str,
                 num_query_tokens: int = 32, qformer: QFormerConfig | None = None, train_encoder: bool = False,
                 end_token_id: int | None = None, qformer_text_input: bool = False,
                 qformer_tokenizer: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder = unfreeze_(encoder) if train_encoder else freeze_(encoder)
        self.qformer_tokenizer = instruction_tokenizer(qformer_text_input, qformer_tokenizer)
        sizes = part_kwargs(QFormerConfig, qformer)
        if self.qformer_tokenizer is not None:
            sizes.setdefault("vocab_size", len(self.qformer_tokenizer))
            check_instruction_vocab(self.qformer_tokenizer, sizes["vocab_size"], qformer_tokenizer)
        self.qformer = QFormer(encoder.width, num_query_tokens=num_query_tokens, with_text=qformer_text_input, **sizes)
        self.language_projection = nn.Linear(self.qformer.query_tokens.shape[-1], language_model.width)
        self.language_model = language_model
        self.image_marker = prefix_image_marker(num_query_tokens)
        self.tokenizer = load_tokenizer(tokenizer, self.image_marker.tokens())
        self.placeholder_ids = placeholder_ids(self.tokenizer, [self.image_marker])
        self.image_token_id = self.placeholder_ids["image"]  # transformers' ``image_token_index``
        if len(self.tokenizer) > language_model.vocab_size:
            language_model.resize_token_embeddings(len(self.tokenizer))
        freeze_(language_model)
        self.end_token_id = end_token_id
        if end_token_id is not None:
            stop_generation_at(language_model, check_token_id(end_token_id, self.tokenizer))
        self.seq2seq = is_seq2seq(language_model)
        self.evaluation = Evaluation(LossEvaluator(), GenerationEvaluator())

    @classmethod
    def from_hf(cls, name_or_path: str, tokenizer: str | None = None, vision_dtype: str | None = None,
                lm_dtype: str | None = None, attn_implementation: str | None = None, quantization: str | None = None,
                lora: LoRA | None = None, train_encoder: bool = False, end_token_id: int | None = None,
                qformer_text_input: bool | None = None, qformer_tokenizer: str | None = None,
                qformer_text_from: str | None = None, **settings: Unpack[ModuleSettings]) -> Blip2:
        """Build from a ``transformers.Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration``
        directory or hub id, strictly.

        Args:
            name_or_path: the checkpoint's directory or hub id.
            tokenizer: hub id or directory of the tokenizer (default: the checkpoint's).
            vision_dtype: dtype of the ViT (see :func:`mmlm.convert.blip2_hf.blip2_from_hf`).
            lm_dtype: dtype of the language model.
            attn_implementation: the LM's attention kernel (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``…);
                ``None`` keeps transformers' default.
            quantization: ``"4bit"`` (NF4, QLoRA) or ``"8bit"`` bitsandbytes LM weights (CUDA only; docs/lora.md).
            lora: LoRA adapters on the LM (:class:`~mmlm.lora.LoRA`): they train, its base stays frozen.
            train_encoder: the ViT trains too (see :class:`Blip2`), but for its ``post_layernorm``, which the Q-Former's
                ``vision_norm`` replaces.
            end_token_id: the token that ends targets and stops generation (see :class:`Blip2`); ``None``: the
                checkpoint's generation config's eos (``"\\n"`` in Salesforce's OPT checkpoints), else its text
                config's. The id used is recorded, so a training checkpoint reloads with it.
            qformer_text_input: instruction-aware queries (see :class:`Blip2`); ``None``: the checkpoint's
                (InstructBLIP reads instructions, BLIP-2 does not).
            qformer_tokenizer: the Q-Former's tokenizer; ``None``: an InstructBLIP checkpoint's ``qformer_tokenizer/``,
                else ``qformer_text_from``.
            qformer_text_from: a BERT checkpoint (``bert-base-uncased``) that gives a BLIP-2 checkpoint's queries-only
                Q-Former the text side instruction-aware queries need (:func:`mmlm.convert.blip2_hf.blip2_from_hf`).
            **settings: any :class:`~mmlm.models.base.ModuleSettings` key (``lr``, ``generation``, …); LightningCLI
                checks each one from YAML (``class_path: mmlm.models.Blip2.from_hf``).
        """
        kwargs = dict(settings, train_encoder=train_encoder)
        lora = LoRA(**lora) if isinstance(lora, dict) else lora  # a checkpoint records it as a dict
        options = dict(attn_implementation=attn_implementation, quantization=quantization, lora=lora,
                       qformer_text_from=qformer_text_from)
        model = blip2_from_hf(cls, name_or_path, tokenizer=tokenizer, vision_dtype=vision_dtype, lm_dtype=lm_dtype,
                              end_token_id=end_token_id, qformer_text_input=qformer_text_input,
                              qformer_tokenizer=qformer_tokenizer, **options, **kwargs)
        model.record_builder("from_hf", dict(name_or_path=name_or_path, tokenizer=tokenizer, vision_dtype=vision_dtype,
                                             lm_dtype=lm_dtype, end_token_id=model.end_token_id,
                                             qformer_text_input=model.qformer.with_text,
                                             qformer_tokenizer=model.hparams.qformer_tokenizer, **options, **kwargs))
        return model

    def to_hf(self, directory: str | Path) -> None:
        """Write a directory that ``Blip2ForConditionalGeneration.from_pretrained`` (and ``Blip2Processor``) load."""
        blip2_to_hf(self, directory)

    def data_spec(self) -> DataSpec:
        """The base's spec plus the image marker (M query slots) that starts every sentence and the end token of
        targets (``None`` when it is the tokenizer's eos)."""
        end = None if self.end_token_id == self.tokenizer.eos_token_id else self.end_token_id
        return replace(super().data_spec(), markers=(self.image_marker,), end_token_id=end,
                       instruction_tokenizer=self.qformer_tokenizer)

    def encode_images(self, pixels: torch.Tensor, features: torch.Tensor | None = None,
                      instruction_ids: torch.Tensor | None = None,
                      instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels [B, 3, H, W]`` (or the frozen encoder's cached ``features [B, N, Dv]``) → soft prompt ``[B, M, D]``
        in the LM's dtype (Q-Former and projection in fp32). With ``qformer_text_input``, ``instruction_ids`` and
        ``instruction_mask [B, Q]`` (each image's prompt in the Q-Former's tokenizer) join the queries.

        Raises:
            ValueError: instructions missing with ``qformer_text_input``, or given without it.
        """
        if (instruction_ids is not None) != self.qformer.with_text:
            raise ValueError("Blip2: the batch's instruction_ids do not fit qformer_text_input="
                             f"{self.qformer.with_text} (the datamodule tokenises prompts for the Q-Former when the "
                             "model's data_spec() gives its instruction_tokenizer)")
        image = self.encoder_tokens(pixels, features)  # [B, N, Dv], encoder dtype; the Q-Former casts it to fp32
        queries = self.qformer(image, input_ids=instruction_ids, attention_mask=instruction_mask).query  # [B, M, H]
        projected = self.language_projection(queries.to(self.language_projection.weight.dtype))
        return projected.to(self.language_model.dtype)

    def embed(self, ids: torch.Tensor, spans: Sequence[Sequence[Span]], batch: SentenceBatch) -> torch.Tensor:
        """``ids [B, T]`` with their image spans filled with the soft prompts of the batch's images → ``[B, T, D]``."""
        images = {"image": self.encode_images(batch.images, batch.features, batch.instruction_ids,
                                              batch.instruction_mask)}
        return embed_sentence(self.language_model.embed, ids, spans, images, self.placeholder_ids)

    def forward(self, batch: SentenceBatch) -> LMOutput:
        """Teacher-forced pass. Decoder-only: logits ``[B, M+T, V]`` over the sentence ``input_ids``, loss on
        ``batch.labels``. Seq2seq: the encoder reads the prompt sentence ``prompt_ids``, decoder logits ``[B, T', V]``
        for the target tokens of ``batch.labels``."""
        if self.seq2seq:
            packing_arguments(batch, self.language_model)  # refuses packed rows
            embeds = self.embed(batch.prompt_ids, batch.prompt_spans, batch)
            return self.language_model(embeds, batch.prompt_mask, targets_only(batch.labels))
        embeds = self.embed(batch.input_ids, batch.spans, batch)
        return self.language_model(embeds, batch.attention_mask, batch.labels,
                                   **packing_arguments(batch, self.language_model))

    def training_loss(self, batch: SentenceBatch) -> torch.Tensor:
        """Cross-entropy of the target tokens (caption/answer + end token) given the image and the prompt."""
        return self(batch).loss

    @torch.no_grad()
    def generate_text(self, batch: SentenceBatch) -> list[str]:
        """Decode from the prompt sentence ``[soft prompt; prompt]`` (the causal LM continues it, the seq2seq encoder
        reads it)."""
        embeds = self.embed(batch.prompt_ids, batch.prompt_spans, batch)
        return self.decode(self.language_model.generate(embeds, batch.prompt_mask, self.generation))
