"""BLIP-2 stage 1 (Li et al. 2023): vision-language representation learning from a frozen image encoder.

image ─► frozen encoder [B, N, Dv] ─► Q-Former (M queries + text side, one BERT-style stack) with three masks:

* ITC (unimodal mask): queries ─► vision_proj ─► ``[B, M, D]``; ``[CLS] text`` ─► text_proj ─► ``[B, D]``;
  contrastive loss with the maximum over queries, positives by image id, label smoothing 0.1, gathered across
  ranks *with* gradient (LAVIS gathers without: a documented difference, see :func:`mmlm.losses.contrastive_loss`).
* ITM (bidirectional mask): ``[queries; [CLS] text]`` for B positives + 2B hard negatives ─► itm_head on
  the query outputs, averaged over the M queries ─► ``[3B, 2]``.
* ITG (multimodal-causal mask): ``[queries; [DEC] text]`` ─► LM head tied to the Q-Former word embeddings (BERT's
  MLM head when the Q-Former comes from BERT) ─► next-token loss on the caption tokens, label smoothing 0.1.

The image tokens pass the Q-Former's trainable ``vision_norm`` (LAVIS's ``ln_vision``) first. The temperature is
CLIP-style (log scale, clamped to [0.001, 0.5]); LAVIS's BLIP-2 learns ``tau`` itself, unclamped.

Text is the *target* span of ``batch.labels`` (``!= -100``: caption + eos), so any prompt the datamodule put
before it is ignored; ``[CLS]`` (the tokenizer's cls, else bos) or ``[DEC]`` (an added special token) goes in
front. Shape legend: B batch, N image tokens, M queries, H Q-Former width, T text tokens, D embed_dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.attention_masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from mmlm.batch import Batch
from mmlm.checkpointing import load_checkpoint_file
from mmlm.connectors.qformer import TEXT_SIDE_KEYS, QFormer, QFormerConfig, bert_init
from mmlm.convert.blip2 import bert_lm_head_state
from mmlm.encoders.base import VisionEncoder
from mmlm.evaluation import Evaluation, RetrievalEvaluator, RetrievalStep
from mmlm.freezing import freeze_
from mmlm.fusion import targets_only
from mmlm.heads import TiedLMHead
from mmlm.hub import load_state_dict_strict
from mmlm.losses import (
    IGNORE_INDEX,
    ContrastiveOutput,
    Temperature,
    causal_lm_loss,
    contrastive_loss,
    hard_negative_itm_loss,
    image_id_tensor,
)
from mmlm.models.base import MultimodalModule
from mmlm.sizes import part_kwargs
from mmlm.tokenizers import load_tokenizer

DEC_TOKEN = "[DEC]"
#: Q-Former keys of the text side, absent from the queries-only stage-2 Q-Former.
#: ``qformer`` keys a BERT-initialised Q-Former takes (the rest comes from BERT).
BERT_OPTIONS = {"cross_attention_freq", "vision_norm", "vision_norm_eps"}


@dataclass
class Stage1Output:
    """Losses (scalars) and ITC features: ``image_feats [B, M, D]`` and ``text_feats [B, D]``, L2-normalised."""

    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    image_feats: torch.Tensor
    text_feats: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """ITC + ITM + ITG (equal weights, as in BLIP-2)."""
        return self.itc + self.itm + self.itg


def stage1_tokenizer(name_or_path: str) -> Any:
    """The Q-Former's tokenizer with ``[DEC]`` added; a BERT tokenizer gets bos = [CLS], eos = [SEP] (collate needs eos)."""
    tokenizer = load_tokenizer(name_or_path, [DEC_TOKEN])
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def grow_embedding(embedding: nn.Embedding, size: int, std: float = 0.02) -> nn.Embedding:
    """A copy of ``embedding`` with ``size`` rows (new rows drawn like BERT's, normal(0, ``std``))."""
    grown = nn.Embedding(size, embedding.embedding_dim).to(embedding.weight)
    nn.init.normal_(grown.weight, std=std)
    with torch.no_grad():
        grown.weight[: embedding.num_embeddings] = embedding.weight
    return grown


class Blip2Stage1(MultimodalModule):
    """BLIP-2 stage 1: ITC + ITM + ITG on a Q-Former with a text side, over a frozen vision encoder.

    Args:
        encoder: the vision encoder; frozen here whatever its own ``freeze`` says.
        tokenizer: hub id or directory of the Q-Former's (BERT-style) tokenizer; ``[DEC]`` is added.
        num_query_tokens: M.
        qformer: the Q-Former's size (:class:`~mmlm.connectors.QFormerConfig`: ``hidden_size``, ``num_layers``, …,
            ``initializer_range``, ``vision_norm``; ``vocab_size`` defaults to the tokenizer's size). With ``bert``
            only ``cross_attention_freq``, ``vision_norm`` and ``vision_norm_eps`` are allowed.
        bert: hub id or directory of a BERT to initialise the Q-Former from (:meth:`QFormer.from_bert`); its MLM
            head, when the checkpoint has one (``bert-base-uncased`` does), initialises the ITG head, as in LAVIS.
        embed_dim: D of the contrastive space.
        label_smoothing: of the ITC targets and the ITG tokens (LAVIS: 0.1 for both; ITM has none).
        itm_rerank_k: > 0: at the end of validation/test also re-rank each image's top-k texts (and each text's
            top-k images) by ITC with the ITM head and log ``{stage}/rerank_i2t_r1`` …; keeps the frozen image
            tokens and caption ids of the evaluation set on the CPU (:mod:`mmlm.evaluation.retrieval`).
        **kwargs: optimisation settings of :class:`MultimodalModule`.
    """

    def __init__(self, encoder: VisionEncoder, tokenizer: str, num_query_tokens: int = 32,
                 qformer: QFormerConfig | None = None, bert: str | None = None, embed_dim: int = 256,
                 itm_rerank_k: int = 0, label_smoothing: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.encoder = freeze_(encoder)
        self.tokenizer = stage1_tokenizer(tokenizer)
        self.qformer = self._build_qformer(encoder.width, num_query_tokens, part_kwargs(QFormerConfig, qformer), bert)
        word, std = self.qformer.embeddings.word, self.qformer.initializer_range
        if len(self.tokenizer) > word.num_embeddings:
            self.qformer.embeddings.word = word = grow_embedding(word, len(self.tokenizer), std)
        hidden = word.embedding_dim
        self.vision_proj, self.text_proj = nn.Linear(hidden, embed_dim), nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.lm_head = self._build_lm_head(hidden, word.num_embeddings, std, bert)
        self.label_smoothing = label_smoothing
        self.temperature = Temperature(0.07)
        self.cls_id = self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else self.tokenizer.bos_token_id
        self.dec_id = self.tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        self.pad_id = self.tokenizer.pad_token_id
        self.evaluation = Evaluation(RetrievalEvaluator(rerank_k=itm_rerank_k))

    def _build_qformer(self, width: int, num_queries: int, options: dict[str, Any], bert: str | None) -> QFormer:
        if bert is None:
            return QFormer(width, num_query_tokens=num_queries, with_text=True,
                           **{"vocab_size": len(self.tokenizer), **options})
        if set(options) - BERT_OPTIONS:
            raise ValueError(f"Blip2Stage1(bert={bert!r}) takes its sizes from BERT; qformer may only set "
                             f"{sorted(BERT_OPTIONS)}, got {sorted(options)}")
        return QFormer.from_bert(bert, width, num_queries, **options)

    @staticmethod
    def _build_lm_head(hidden: int, vocab_size: int, std: float, bert: str | None) -> TiedLMHead:
        """BERT's LM head: initialised like BERT, then BERT's MLM head when ``bert`` has one."""
        head = TiedLMHead(hidden, vocab_size)
        head.apply(partial(bert_init, std=std))
        state = None if bert is None else bert_lm_head_state(bert, vocab_size)
        if state is not None:
            load_state_dict_strict(head, state, f"{bert} MLM head")
        return head

    def text_inputs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels [B, T]`` → ``([CLS] target, mask)``, each ``[B, 1 + T']`` (target = caption + eos, right-padded)."""
        target = targets_only(labels)
        valid = target != IGNORE_INDEX
        start = torch.full_like(target[:, :1], self.cls_id)
        ids = torch.cat([start, target.masked_fill(~valid, self.pad_id)], dim=1)
        return ids, torch.cat([torch.ones_like(start), valid.long()], dim=1)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(frozen image tokens [B, N, Dv], [CLS] text ids [B, T], mask [B, T], image ids [B])`` of ``batch``
        (``batch.ids`` are the image ids of caption samples: equal ids are ITC positives)."""
        with torch.no_grad():
            image = self.encoder_tokens(batch.pixels, batch.features)
        ids, mask = self.text_inputs(batch.labels)
        return image, ids, mask, image_id_tensor(batch.ids, batch.labels.device)

    def forward(self, batch: Batch) -> Stage1Output:
        """The three losses of ``batch`` and the ITC features."""
        return self.objectives(*self.inputs(batch))

    def objectives(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor
                   ) -> Stage1Output:
        """ITC, ITM and ITG of image tokens ``[B, N, Dv]`` and texts ``[B, T]``."""
        itc, image_feats, text_feats = self.itc(image, ids, mask, image_ids)
        itm = hard_negative_itm_loss(self.itm_logits, image, ids, mask, image_ids, itc, self.pad_id)
        return Stage1Output(itc.loss, itm, self.itg(image, ids, mask), image_feats, text_feats)

    def itc(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor,
            ) -> tuple[ContrastiveOutput, torch.Tensor, torch.Tensor]:
        """Unimodal pass → ``(ContrastiveOutput, image_feats [B, M, D], text_feats [B, D])``."""
        out = self.qformer(image, input_ids=ids, self_attn_mask=unimodal_mask(mask, self.qformer.num_query_tokens))
        image_feats = F.normalize(self.vision_proj(out.query), dim=-1)
        text_feats = F.normalize(self.text_proj(out.text[:, 0]), dim=-1)
        result = contrastive_loss(image_feats, text_feats, self.temperature(), image_ids=image_ids, gather=True,
                                  label_smoothing=self.label_smoothing)
        return result, image_feats, text_feats

    def itm_logits(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional pass over ``image [P, N, Dv]`` and ``ids, mask [P, T]`` → match logits ``[P, 2]``."""
        out = self.qformer(image, input_ids=ids, self_attn_mask=bidirectional_mask(mask, self.qformer.num_query_tokens))
        return self.itm_head(out.query).mean(dim=1)

    def itg_logits(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multimodal-causal pass over ``[queries; [DEC] text]`` → next-token logits ``[B, T, V]``."""
        ids = torch.cat([torch.full_like(ids[:, :1], self.dec_id), ids[:, 1:]], dim=1)
        mask_ = multimodal_causal_mask(mask, self.qformer.num_query_tokens)
        out = self.qformer(image, input_ids=ids, self_attn_mask=mask_)
        return self.lm_head(out.text, self.qformer.embeddings.word.weight)

    def itg(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token loss on the caption tokens (and eos) after ``[DEC]``."""
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        return causal_lm_loss(self.itg_logits(image, ids, mask), labels, self.label_smoothing)

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """ITC + ITM + ITG; logs each as ``train/itc``, ``train/itm``, ``train/itg``."""
        out = self(batch)
        if self._trainer is not None:
            for name in ("itc", "itm", "itg"):
                self.log(f"train/{name}", getattr(out, name), batch_size=len(batch))
        return out.loss

    def generate_text(self, batch: Batch) -> list[str]:
        raise NotImplementedError("Blip2Stage1 learns representations and has no language model to generate with; "
                                  "load its Q-Former into mmlm.models.Blip2 (load_stage1_qformer) for captions/VQA")

    def retrieval_step(self, batch: Batch) -> RetrievalStep:
        """Evaluation: the three losses (and their sum) and the ITC features, with the frozen image tokens and
        texts that ITM re-ranking reads (:class:`~mmlm.evaluation.RetrievalEvaluator`)."""
        image, ids, mask, image_ids = self.inputs(batch)
        out = self.objectives(image, ids, mask, image_ids)
        losses = {"itc": out.itc, "itm": out.itm, "itg": out.itg, "loss": out.loss}
        return RetrievalStep(losses, out.image_feats, out.text_feats, image_ids, image, ids, mask)


def qformer_state_for_stage2(state_dict: dict[str, torch.Tensor], with_text: bool = False) -> dict[str, torch.Tensor]:
    """A :class:`Blip2Stage1` state dict (or Lightning checkpoint ``state_dict``) → the state of ``Blip2.qformer``:
    ``qformer.*`` keys without the prefix; the text side (word/position embeddings, text FFNs) kept only
    ``with_text`` (instruction-aware queries), else dropped (the queries-only Q-Former)."""
    prefix = "qformer."
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state:
        raise KeyError(f"no '{prefix}*' keys in the stage-1 state dict (first keys: {list(state_dict)[:5]})")
    return {k: v for k, v in state.items() if with_text or not any(part in k for part in TEXT_SIDE_KEYS)}


def load_stage1_qformer(stage2: nn.Module, checkpoint: str | Path | dict[str, torch.Tensor]) -> None:
    """Load a stage-1 Q-Former (a ``.ckpt`` path or a state dict) into ``stage2.qformer`` strictly
    (every key must match: same sizes and number of queries), with its text side when ``stage2`` reads instructions
    (``qformer_text_input``)."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint_file(checkpoint)["state_dict"]
    state = qformer_state_for_stage2(checkpoint, with_text=stage2.qformer.with_text)
    stage2.qformer.load_state_dict(state, strict=True)
