"""BLIP-2 Querying Transformer (Q-Former) and its stage-2 connector.

A BERT-style post-LN encoder over the joint sequence ``[queries; text]``:

* the frozen image tokens first pass a trainable LayerNorm (``vision_norm``, LAVIS's ``ln_vision``; transformers
  keeps it in the vision model as ``post_layernorm``), so both BLIP-2 stages get it from the Q-Former;
* ``M`` learned query tokens go first, text tokens (word + position embeddings) after; one LayerNorm
  (``embeddings.norm``) normalises both, as in BLIP-2.
* every layer: self-attention over the joint sequence (the mask picks the BLIP-2 regime, see
  :mod:`mmlm.attention_masks`) → cross-attention to the image tokens for the query positions only (layers
  ``0, f, 2f, …`` with ``f = cross_attention_freq``) → a FFN for the query positions
  (``query_ffn``, BLIP-2's ``intermediate_query``/``output_query``) and a separate one for the text
  positions (``text_ffn``).

Shape legend: B batch, N image tokens, Dv image width, M queries, T text tokens, H hidden size.
Weight import: :meth:`QFormer.from_bert` (BERT init as in BLIP-2) and :mod:`mmlm.convert.blip2`
(transformers' ``Blip2QFormerModel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.attention_masks import bidirectional_mask

#: Parts of the state dict of a :class:`QFormer` that only its text side has (``with_text=True``).
TEXT_SIDE_KEYS = ("embeddings.word.", "embeddings.position.", ".text_ffn.")


@dataclass(frozen=True)
class QFormerConfig:
    """The Q-Former's size as a family's config gives it (``qformer: {hidden_size: 64, num_layers: 2, …}``), checked
    key by key by the CLI. ``None`` keeps :class:`QFormer`'s default (or BERT's, for a Q-Former initialised from
    BERT); the family supplies the encoder width, the query count and whether there is a text side."""

    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    cross_attention_freq: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    layer_norm_eps: float | None = None
    dropout: float | None = None
    initializer_range: float | None = None
    vision_norm: bool | None = None
    vision_norm_eps: float | None = None


@dataclass
class QFormerOutput:
    """Final hidden states split by position kind.

    Attributes:
        query: ``[B, M, H]``, or ``None`` when no image was given (text-only pass).
        text: ``[B, T, H]``, or ``None`` when no ``input_ids`` were given.
    """

    query: torch.Tensor | None
    text: torch.Tensor | None


class QFormerAttention(nn.Module):
    """Multi-head attention + BERT's post-LN residual: ``norm(x + dropout(out(attn(x, context))))``.

    Keys and values come from ``context`` (width ``kv_dim``) for cross-attention, from ``x`` otherwise.
    """

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int, eps: float, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(kv_dim, hidden_size)
        self.v = nn.Linear(kv_dim, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H]`` → ``[B, heads, L, H / heads]``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, H]``, ``context [B, S, kv_dim]`` (default ``x``), bool ``mask`` broadcastable to
        ``[B, L, S]`` (True = may attend) → ``[B, L, H]``."""
        context = x if context is None else context
        q, k, v = self._heads(self.q(x)), self._heads(self.k(context)), self._heads(self.v(context))
        attn_mask = None if mask is None else mask.bool().unsqueeze(1)
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.norm(x + self.drop(self.out(attended.transpose(1, 2).flatten(2))))


class QFormerFeedForward(nn.Module):
    """BERT's FFN + post-LN residual: ``norm(x + dropout(fc2(gelu(fc1(x)))))``, ``[B, L, H]`` → ``[B, L, H]``."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, H]`` → ``[B, L, H]``."""
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """Joint self-attention, query-only cross-attention (if ``cross_attention``), split FFNs."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, encoder_width: int,
                 cross_attention: bool, with_text: bool, eps: float, dropout: float) -> None:
        super().__init__()
        self.self_attn = QFormerAttention(hidden_size, num_heads, hidden_size, eps, dropout)
        self.cross_attn = QFormerAttention(hidden_size, num_heads, encoder_width, eps, dropout) if cross_attention else None
        self.query_ffn = QFormerFeedForward(hidden_size, intermediate_size, eps, dropout)
        self.text_ffn = QFormerFeedForward(hidden_size, intermediate_size, eps, dropout) if with_text else None

    def forward(self, x: torch.Tensor, num_queries: int, self_mask: torch.Tensor | None,
                image: torch.Tensor | None, image_mask: torch.Tensor | None) -> torch.Tensor:
        """``x [B, M+T, H]``, ``self_mask [B, M+T, M+T]``, ``image [B, N, Dv]``, ``image_mask [B, 1, N]``
        → ``[B, M+T, H]``."""
        x = self.self_attn(x, mask=self_mask)
        query, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                query = self.cross_attn(query, image, image_mask)
            parts.append(self.query_ffn(query))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1)


class QFormerEmbeddings(nn.Module):
    """``[queries; word + position embeddings of the text]`` → LayerNorm → dropout.

    ``with_text=False`` keeps only the LayerNorm (queries-only Q-Former, as in stage 2).
    """

    def __init__(self, hidden_size: int, vocab_size: int, max_position_embeddings: int, with_text: bool,
                 eps: float, dropout: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden_size) if with_text else None
        self.position = nn.Embedding(max_position_embeddings, hidden_size) if with_text else None
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        """``queries [B, M, H]`` and/or ``input_ids [B, T]`` → ``[B, M+T, H]``."""
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            if self.word is None:
                raise ValueError("this QFormer was built with with_text=False and cannot take input_ids")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))
        return self.drop(self.norm(torch.cat(parts, dim=1)))


class QFormer(nn.Module):
    """BLIP-2's Q-Former: ``M`` learned queries read the image through cross-attention and share
    self-attention with the text.

    Args:
        encoder_width: Dv, the width of the image tokens (cross-attention keys/values).
        num_query_tokens: M.
        hidden_size: H.
        num_layers: transformer layers.
        num_heads: attention heads.
        intermediate_size: FFN width.
        cross_attention_freq: cross-attention in layers ``0, f, 2f, …``.
        vocab_size: text vocabulary (BERT's by default).
        max_position_embeddings: longest text T.
        layer_norm_eps: LayerNorm epsilon.
        dropout: hidden and attention-probability dropout.
        with_text: build the text side (word/position embeddings, text FFNs); ``False`` gives the
            queries-only Q-Former of transformers' ``Blip2ForConditionalGeneration``.
        initializer_range: std of the normal init of every Linear/Embedding weight and of the query tokens
            (BERT's 0.02, as BLIP-2; a narrow Q-Former needs more, e.g. 0.1 at width 64: see docs/blip2.md).
        vision_norm: a trainable ``LayerNorm(encoder_width)`` on the image tokens before cross-attention
            (LAVIS's ``ln_vision``). ``False`` for an encoder that already ends in this norm (transformers'
            ``Blip2QFormerModel`` alone, whose vision model applies it as ``post_layernorm``).
        vision_norm_eps: its epsilon (LAVIS: ``nn.LayerNorm``'s 1e-5; transformers: the vision config's).
    """

    def __init__(self, encoder_width: int, num_query_tokens: int = 32, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int = 3072, cross_attention_freq: int = 2,
                 vocab_size: int = 30522, max_position_embeddings: int = 512, layer_norm_eps: float = 1e-12,
                 dropout: float = 0.1, with_text: bool = True, initializer_range: float = 0.02,
                 vision_norm: bool = True, vision_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.num_query_tokens, self.with_text, self.initializer_range = num_query_tokens, with_text, initializer_range
        self.vision_norm = nn.LayerNorm(encoder_width, eps=vision_norm_eps) if vision_norm else None
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, hidden_size))
        self.embeddings = QFormerEmbeddings(hidden_size, vocab_size, max_position_embeddings, with_text,
                                            layer_norm_eps, dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_size, num_heads, intermediate_size, encoder_width, i % cross_attention_freq == 0,
                         with_text, layer_norm_eps, dropout)
            for i in range(num_layers))
        self.apply(partial(bert_init, std=initializer_range))
        nn.init.normal_(self.query_tokens, std=initializer_range)

    def forward(self, image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                self_attn_mask: torch.Tensor | None = None) -> QFormerOutput:
        """Run the queries (when ``image_embeds`` is given) and/or the text (when ``input_ids`` is given).

        Args:
            image_embeds: ``[B, N, Dv]`` image tokens (before ``vision_norm``); ``None`` = text-only pass (no
                queries, M = 0).
            image_mask: ``[B, N]`` (1/True = real image token); ``None`` = all real.
            input_ids: ``[B, T]`` text ids.
            attention_mask: ``[B, T]`` text padding mask; used only when ``self_attn_mask`` is ``None``.
            self_attn_mask: ``[B, M+T, M+T]`` bool (True = may attend), picks the regime (see
                :mod:`mmlm.attention_masks`); ``None`` = bidirectional with the text padding masked.

        Returns:
            :class:`QFormerOutput` with ``query [B, M, H]`` and ``text [B, T, H]``.
        """
        if image_embeds is None and input_ids is None:
            raise ValueError("QFormer.forward needs image_embeds, input_ids or both")
        if image_embeds is not None:  # the Q-Former stays fp32 behind a half-precision ViT (BLIP-2)
            image_embeds = image_embeds.to(self.query_tokens.dtype)
            if self.vision_norm is not None:
                image_embeds = self.vision_norm(image_embeds)
        queries = None if image_embeds is None else self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        num_queries = 0 if queries is None else queries.shape[1]
        x = self.embeddings(queries, input_ids)
        self_attn_mask = self._self_mask(x, num_queries, attention_mask, self_attn_mask)
        image_mask = None if image_mask is None else image_mask.bool()[:, None, :]
        for layer in self.layers:
            x = layer(x, num_queries, self_attn_mask, image_embeds, image_mask)
        query, text = x[:, :num_queries], x[:, num_queries:]
        return QFormerOutput(query=query if num_queries else None, text=text if input_ids is not None else None)

    @staticmethod
    def _self_mask(x: torch.Tensor, num_queries: int, attention_mask: torch.Tensor | None,
                   self_attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ``[B, M+T, M+T]`` self-attention mask to use (checked), or ``None`` for no masking."""
        batch, total = x.shape[:2]
        if self_attn_mask is None:
            if attention_mask is None:
                return None
            return bidirectional_mask(attention_mask, num_queries)
        if tuple(self_attn_mask.shape) != (batch, total, total):
            raise ValueError(f"QFormer self_attn_mask has shape {tuple(self_attn_mask.shape)}, expected "
                             f"{(batch, total, total)} (B, M+T, M+T) with M={num_queries}")
        return self_attn_mask.bool()

    @classmethod
    def from_bert(cls, name_or_path: str, encoder_width: int, num_query_tokens: int = 32, **options: Any) -> QFormer:
        """A Q-Former initialised from a BERT checkpoint, as BLIP-2 does.

        Self-attention, text FFNs and embeddings come from BERT (token-type row 0 folded into the
        position embeddings, so text-only outputs equal ``BertModel``'s); query FFNs are copies of the
        text FFNs; cross-attention, query tokens and the vision norm stay new (drawn with BERT's
        ``initializer_range``). Strict: see :func:`mmlm.convert.blip2.qformer_from_bert`.

        Args:
            name_or_path: hub id or local directory of a ``transformers.BertModel`` (pre-training heads allowed).
            encoder_width: Dv of the image tokens.
            num_query_tokens: M.
            **options: the :class:`QFormer` arguments BERT does not set: ``cross_attention_freq``,
                ``vision_norm``, ``vision_norm_eps``.
        """
        from mmlm.convert.blip2 import load_bert_into_qformer

        return load_bert_into_qformer(cls, name_or_path, encoder_width, num_query_tokens, **options)


def bert_init(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init of one module (use with ``Module.apply``): normal(0, ``std``) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def cross_attention_maps(qformer: QFormer, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None,
                         input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights of every cross-attention layer of ``qformer`` over the image tokens, for its queries.

    ``image_embeds [B, N, Dv]`` (``image_mask [B, N]``; with instruction-aware queries, the instruction's
    ``input_ids``/``attention_mask [B, T]``) → ``[B, L, heads, M, N]`` with ``L`` the cross-attention layers; each
    row sums to 1. The forward pass is the ordinary one (fused attention): hooks record each
    cross-attention's query input and image context, and the weights ``softmax(q kᵀ / √d)`` are recomputed from them,
    so the Q-Former's own code and outputs are untouched.
    """
    records: list[torch.Tensor] = []

    def record(module: QFormerAttention, args: tuple[Any, ...]) -> None:
        x, context, mask = (list(args) + [None, None])[:3]
        q, k = module._heads(module.q(x)), module._heads(module.k(context))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, heads, M, N]
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        records.append(scores.softmax(-1))

    hooks = [layer.cross_attn.register_forward_pre_hook(record) for layer in qformer.layers
             if layer.cross_attn is not None]
    try:
        qformer(image_embeds, image_mask, input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(records, dim=1)


class QFormerConnector(nn.Module):
    """BLIP-2 stage-2 soft prompt: Q-Former over the image tokens → Linear(H, out_dim).

    ``tokens [B, N, Dv]`` → ``[B, M, out_dim]``. Usable wherever a connector
    ``Callable[[int, int], nn.Module]`` is expected (``in_dim`` = Dv, ``out_dim`` = LM width).

    Args:
        in_dim: encoder width Dv.
        out_dim: language-model width D.
        num_query_tokens: M.
        hidden_size, num_layers, num_heads, intermediate_size, cross_attention_freq, layer_norm_eps,
            dropout, initializer_range, vision_norm, vision_norm_eps: as in :class:`QFormer`.
        with_text: keep the Q-Former's text side (e.g. to load a stage-1 checkpoint strictly).
    """

    def __init__(self, in_dim: int, out_dim: int, num_query_tokens: int = 32, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072,
                 cross_attention_freq: int = 2, layer_norm_eps: float = 1e-12, dropout: float = 0.1,
                 with_text: bool = False, initializer_range: float = 0.02, vision_norm: bool = True,
                 vision_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.qformer = QFormer(in_dim, num_query_tokens=num_query_tokens, hidden_size=hidden_size,
                               num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
                               cross_attention_freq=cross_attention_freq, layer_norm_eps=layer_norm_eps,
                               dropout=dropout, with_text=with_text, initializer_range=initializer_range,
                               vision_norm=vision_norm, vision_norm_eps=vision_norm_eps)
        self.proj = nn.Linear(hidden_size, out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [B, N, Dv]`` (``mask [B, N]``) → ``[B, M, out_dim]``."""
        return self.proj(self.qformer(tokens, image_mask=mask).query)
