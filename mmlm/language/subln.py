"""The built-in Sub-LN (MAGNETO) decoder behind the ``LanguageModel`` interface.

MAGNETO (Wang et al. 2022, "Foundation Transformers", the decoder of KOSMOS-1) adds a second
LayerNorm inside each sublayer, before its output projection ("Sub-LN"), and scales part of the
initial weights by ``gamma`` so that deep stacks train stably.

Positions count the real tokens before each one (:func:`positions_from_mask`), so a left-padded row
gives the same logits and generations as the unpadded row. They enter either as learned absolute
embeddings (``position="learned"``, a fixed ``max_positions``), or as relative rotations of queries
and keys: rotary (``"rotary"``, RoPE) or xPos (``"xpos"``, Sun et al. 2022 "A Length-Extrapolatable
Transformer", the positions of KOSMOS-1): RoPE plus a per-frequency exponential decay
``zeta_i ** ((n - m) / scale_base)`` of the query–key product with distance. As in torchscale's ``XPOS``
the query and key scales are centred on the current length (not on a fixed ``max_positions``), so they stay
finite in fp16/bf16 far past the trained length; past the span the dtype can hold
(:meth:`RelativePositions.block_span`) the queries go through attention in blocks, each centred on itself.

Packed sequences (several samples in one row): ``forward(..., segment_ids=…)`` uses a block-diagonal
causal mask (:func:`mmlm.attention_masks.packed_causal_mask`) and per-sample positions, still through SDPA.

Shape legend: B batch, K beams, T text tokens, S key tokens (cache + new), T_new generated tokens,
D width, H heads, V vocabulary.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmlm.attention_masks import causal_mask, packed_causal_mask, positions_from_mask, segment_positions
from mmlm.freezing import freeze_
from mmlm.language.base import GenerationConfig, LanguageModel, LMOutput, next_tokens
from mmlm.language.recompute import recompute_blocks
from mmlm.lora import LoRA, merge_lora_
from mmlm.losses import causal_head_loss

#: One layer's cached keys and values, each ``[B, H, S, D / H]``.
LayerCache = tuple[torch.Tensor, torch.Tensor]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

#: Names of the weights MAGNETO scales by gamma at initialisation (value, output and FFN projections).
SCALED_WEIGHTS = ("v_proj", "out_proj", "fc1", "fc2")

#: The layers LoRA adapts by default: each attention's q, k, v and output projections.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

#: Position encodings of :class:`SubLNDecoder`.
POSITIONS = ("learned", "rotary", "xpos")

#: ``log(2 ** 6)``: headroom left under a dtype's largest value for the q/k entries an xPos scale multiplies.
XPOS_HEADROOM = 6 * math.log(2)


@dataclass
class Rotation:
    """One call's relative positions.

    Attributes:
        cos: ``[B, 1, T, D/H/2]`` cosines of the new tokens' angles (float32).
        sin: ``[B, 1, T, D/H/2]`` sines.
        queries: ``[B, T]`` positions of the new tokens.
        keys: ``[B, S]`` positions of all keys (cache + new).
        relative: the module that scales them (xPos decay when its ``scale_base`` is set).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    relative: RelativePositions


def magneto_gamma(depth: int) -> float:
    """MAGNETO's initialisation scale for a decoder-only stack of ``depth`` layers: ``sqrt(log(2 N))``.

    Wang et al. 2022, "Foundation Transformers", §2.2 (Initialization, from the DeepNet-style
    derivation): an N-layer decoder scales W^V, W^O and both FFN weights by ``gamma = sqrt(log 2N)``
    after Xavier initialisation (encoder-only: ``sqrt(log 2N)`` too; encoder–decoder use
    ``sqrt(log(3M) log(2N) / 3)``). As in the paper, a single layer gets ``sqrt(log 2) < 1``.
    """
    return math.sqrt(math.log(2 * depth))


def attention_bias(attention_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean SDPA mask ``[B, 1, T, S]`` (True = may attend) for the last ``T`` of ``S`` keys.

    ``attention_mask [B, S]`` marks real keys (cache + new). Each query sees real keys up to itself,
    and always itself, so a padding query has a finite (unused) output instead of NaN.
    """
    num_keys = attention_mask.shape[1]
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=attention_mask.device)
    key_pos = torch.arange(num_keys, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return (allowed | (key_pos[None, :] == query_pos[:, None])[None])[:, None]


class RelativePositions(nn.Module):
    """Rotary position rotations, with xPos decay when ``scale_base`` is given.

    Frequency ``i`` of a head of width ``d`` turns by ``pos * 10000 ** (-2i/d)``; xPos multiplies the
    query by ``zeta_i ** (pos/scale_base)`` and the key by ``zeta_i ** (-pos/scale_base)`` with
    ``zeta_i = (2i + 0.4 d) / (1.4 d)``, so their product decays as ``zeta_i ** (distance/scale_base)``.
    Positions are taken relative to a centre (any constant cancels in the product): the middle of the
    current positions, as torchscale's ``XPOS`` (``min_pos = -(length + offset) // 2``), so the scales stay
    within ``zeta ** (±length / 2 / scale_base)`` whatever ``max_positions`` was.
    """

    def __init__(self, head_dim: int, scale_base: float | None, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"SubLNDecoder: rotary/xpos positions need an even head width, got {head_dim}")
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32)
        self.register_buffer("inv_freq", base ** (-steps / head_dim), persistent=False)
        self.register_buffer("zeta", (steps + 0.4 * head_dim) / (1.4 * head_dim), persistent=False)
        self.scale_base = scale_base

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B, T]`` → ``(cos, sin)``, each ``[B, 1, T, D/H/2]`` (float32)."""
        angle = positions.float()[:, None, :, None] * self.inv_freq
        return angle.cos(), angle.sin()

    def decay(self, offsets: torch.Tensor) -> torch.Tensor:
        """``offsets [B, T]`` (position − centre for queries, centre − position for keys) → xPos scales
        ``zeta ** (offset / scale_base)``, ``[B, 1, T, D/H/2]`` (float32)."""
        return self.zeta ** (offsets.float()[:, None, :, None] / self.scale_base)

    def block_span(self, dtype: torch.dtype) -> int:
        """Most query positions per attention block: their query scale times the scale of any key up to the
        block's last query (a masked future key included) stays below ``dtype``'s largest value with
        :data:`XPOS_HEADROOM` to spare (``scale_base`` 512: fp16 2,830 positions, bf16/fp32 ~34,500)."""
        limit = math.log(torch.finfo(dtype).max) - XPOS_HEADROOM
        return max(1, int(limit * self.scale_base / -math.log(float(self.zeta.min()))))

    def forward(self, positions: torch.Tensor, center: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``positions [B, T]`` → ``(cos, sin, q_scale, k_scale)``, each ``[B, 1, T, D/H/2]`` (float32);
        the scales are centred on ``center [B]`` (default: the middle of each row's positions, as torchscale)
        and are ones without ``scale_base``."""
        cos, sin = self.angles(positions)
        if self.scale_base is None:
            return cos, sin, torch.ones_like(cos), torch.ones_like(cos)
        center = middle(positions) if center is None else center
        offsets = positions - center[:, None]
        return cos, sin, self.decay(offsets), self.decay(-offsets)


def middle(positions: torch.Tensor) -> torch.Tensor:
    """``[B]`` centre of each row of ``positions [B, T]``: torchscale's for ``0 … L-1`` (``ceil(L / 2)``)."""
    return (positions.min(1).values + positions.max(1).values + 2) // 2


def decayed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, rotation: Rotation,
                      dropout: float) -> torch.Tensor:
    """SDPA with xPos scales on rotated ``q [B, H, T, d]`` and ``k``/``v [B, H, S, d]`` (``mask [B, 1, T, S]``).

    Queries go in blocks of :meth:`RelativePositions.block_span` (one block within the trained length), each
    centred on its middle position c: queries are scaled by ``zeta ** ((n - c) / scale_base)`` and keys by
    ``zeta ** ((c - m) / scale_base)``, with a key past the block's last query (masked anyway) counted at
    that query, so no scale exceeds the dtype and far keys only underflow towards 0, as their true weight.
    """
    relative, outs = rotation.relative, []
    span = relative.block_span(q.dtype)
    for start in range(0, q.shape[2], span):
        block = rotation.queries[:, start:start + span]
        center, last = middle(block), block.max(1).values
        q_block = rotate(q[:, :, start:start + span], None, None, relative.decay(block - center[:, None]))
        keys = center[:, None] - torch.minimum(rotation.keys, last[:, None])
        outs.append(F.scaled_dot_product_attention(q_block, rotate(k, None, None, relative.decay(keys)), v,
                                                   attn_mask=mask[:, :, start:start + span], dropout_p=dropout))
    return torch.cat(outs, dim=2)


def rotate(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate pairs ``(x_i, x_{i + d/2})`` of ``x [B, H, T, d]`` by the angles of ``cos``/``sin`` (``None``: no
    rotation) and scale them by ``scale`` (``None``: 1), in float32; returns ``x``'s dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos is not None:
        x1, x2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    if scale is not None:
        x1, x2 = x1 * scale, x2 * scale
    return torch.cat([x1, x2], dim=-1).to(x.dtype)


class SubLNAttention(nn.Module):
    """Sub-LN self-attention sublayer: LN → q/k/v → SDPA → **LN** → out proj (residual added by the block)."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"SubLNDecoder: width={width} is not divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm = nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.inner_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` → ``[B, H, T, D / H]``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: LayerCache | None = None,
                rotation: Rotation | None = None) -> tuple[torch.Tensor, LayerCache]:
        """``x [B, T, D]``, ``mask [B, 1, T, S]`` → ``(out [B, T, D], (k, v) [B, H, S, D / H])``; ``mask`` ``None``:
        causal attention over ``T == S`` keys.

        With ``rotation`` the new queries and keys are rotated (keys before they enter the cache); xPos scales
        are applied per call (:func:`decayed_attention`), so the cache holds rotated, unscaled keys.
        """
        h = self.norm(x)
        q, k, v = self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        if rotation is not None:
            q, k = rotate(q, rotation.cos, rotation.sin), rotate(k, rotation.cos, rotation.sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if rotation is not None and rotation.relative.scale_base is not None:
            mask = causal_mask(q.shape[2], q.device)[None, None] if mask is None else mask
            out = decayed_attention(q, k, v, mask, rotation, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        return self.out_proj(self.inner_norm(out.transpose(1, 2).flatten(2))), (k, v)


class SubLNFeedForward(nn.Module):
    """Sub-LN FFN sublayer: LN → fc1 → GELU → **LN** → fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.fc1 = nn.LayerNorm(width), nn.Linear(width, hidden)
        self.inner_norm, self.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` → ``[B, T, D]``."""
        return self.fc2(self.inner_norm(F.gelu(self.fc1(self.norm(x)))))


class SubLNBlock(nn.Module):
    """One decoder layer: ``x + attn(x)`` then ``x + ffn(x)``, dropout on each sublayer output."""

    def __init__(self, width: int, num_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn = SubLNAttention(width, num_heads, dropout)
        self.ffn = SubLNFeedForward(width, ffn_mult * width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: LayerCache | None = None,
                rotation: Rotation | None = None) -> tuple[torch.Tensor, LayerCache]:
        """``x [B, T, D]``, ``mask [B, 1, T, S]`` → ``(x [B, T, D], this layer's cache)``."""
        attn, cache = self.attn(x, mask, past, rotation)
        x = x + self.drop(attn)
        return x + self.drop(self.ffn(x)), cache


class SubLNDecoder(LanguageModel):
    """A MAGNETO (Sub-LN) decoder-only LM trained from scratch, with its own greedy/sampling/beam generation.

    Args:
        vocab_size: V, rows of the token embedding table.
        width: D, model width (and of ``inputs_embeds``).
        depth: N, number of layers (also sets MAGNETO's ``gamma = sqrt(log 2N)``).
        num_heads: attention heads (must divide ``width``).
        ffn_mult: FFN hidden width is ``ffn_mult * width``.
        max_positions: rows of the learned position table (longest prompt + generation); unused by
            relative positions (no length limit; xPos scales are centred on the current length).
        dropout: on attention probabilities and sublayer outputs (training only).
        pad_token_id: fills generated rows after their eos.
        bos_token_id: kept in the config for tokenizers/recipes (not used inside).
        eos_token_id: ends a generated row.
        tie_embeddings: output head shares the token embedding table.
        position: ``"learned"`` absolute embeddings, ``"rotary"`` (RoPE) or ``"xpos"`` (KOSMOS-1).
        xpos_scale_base: xPos decay length ``gamma`` (512 in the paper).
        freeze: no gradients and eval mode kept; gradients still flow to ``inputs_embeds``.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``…; ``None`` keeps float32.
        grad_checkpointing: recompute each layer's activations in the backward pass, in train and eval mode alike
            (:mod:`mmlm.language.recompute`).
        lora: LoRA adapters (:class:`~mmlm.lora.LoRA`): the decoder's weights are frozen and only the adapters train;
            ``target_modules: null`` adapts the attention projections ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.

    A trained decoder is reloaded with :meth:`from_pretrained`; there is no ``name_or_path`` argument
    because the architecture arguments above would then have two sources (signature and config.json).
    """

    def __init__(self, vocab_size: int, width: int = 512, depth: int = 6, num_heads: int = 8, ffn_mult: int = 4,
                 max_positions: int = 2048, dropout: float = 0.0, pad_token_id: int = 0, bos_token_id: int = 1,
                 eos_token_id: int = 2, tie_embeddings: bool = True, position: str = "learned",
                 xpos_scale_base: float = 512.0, freeze: bool = False, dtype: str | None = None,
                 grad_checkpointing: bool = False, lora: LoRA | None = None) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "vocab_size": vocab_size, "width": width, "depth": depth, "num_heads": num_heads,
            "ffn_mult": ffn_mult, "max_positions": max_positions, "dropout": dropout,
            "pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "tie_embeddings": tie_embeddings, "position": position, "xpos_scale_base": xpos_scale_base}
        if position not in POSITIONS:
            raise ValueError(f"SubLNDecoder: position={position!r}, expected one of {POSITIONS}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= self.config[key] < vocab_size:
                raise ValueError(f"SubLNDecoder: {key}={self.config[key]} is outside the vocabulary "
                                 f"(vocab_size={vocab_size})")
        self.embed_tokens = nn.Embedding(vocab_size, width)
        self.embed_positions = nn.Embedding(max_positions, width) if position == "learned" else None
        scale_base = xpos_scale_base if position == "xpos" else None
        self.relative = None if position == "learned" else RelativePositions(width // num_heads, scale_base)
        self.layers = nn.ModuleList(SubLNBlock(width, num_heads, ffn_mult, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.lm_head = None if tie_embeddings else nn.Linear(width, vocab_size, bias=False)
        self.reset_parameters()
        if grad_checkpointing:
            recompute_blocks(self.layers)
        self.setup_freezing(freeze, dtype)
        if lora is not None:
            self.add_lora(lora)

    def lora_targets(self) -> list[str]:
        """The attention projections of every layer (:data:`LORA_TARGETS`)."""
        return list(LORA_TARGETS)

    def reset_parameters(self) -> None:
        """Xavier-normal linears, zero biases, ``N(0, D^-1/2)`` embeddings; then MAGNETO's gamma scaling."""
        std = self.width ** -0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if self.embed_positions is not None:
            nn.init.normal_(self.embed_positions.weight, std=std)
        gamma = magneto_gamma(self.config["depth"])
        with torch.no_grad():
            for name, param in self.layers.named_parameters():
                if name.endswith("weight") and any(f".{key}." in name for key in SCALED_WEIGHTS):
                    param.mul_(gamma)

    @property
    def width(self) -> int:
        """D, the width of ``inputs_embeds``."""
        return self.embed_tokens.embedding_dim

    @property
    def vocab_size(self) -> int:
        """V, rows of the token embedding table (= logits width)."""
        return self.embed_tokens.num_embeddings

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype; ``inputs_embeds`` are cast to it."""
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, T]`` → ``embeddings [B, T, D]`` (the token table, no positions)."""
        return self.embed_tokens(input_ids)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D]`` → ``logits [..., V]`` through the final LN and (tied) head (each row alone)."""
        hidden = self.final_norm(hidden)
        return self.lm_head(hidden) if self.lm_head is not None else hidden @ self.embed_tokens.weight.T

    def _decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                past: list[LayerCache] | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[LayerCache]]:
        """Run the stack on new tokens.

        Args:
            inputs_embeds: ``[B, T, D]`` new tokens.
            positions: ``[B, T]`` their position ids.
            key_mask: ``[B, S]`` real keys among cache + new tokens (``S = S_past + T``).
            past: one cache per layer, or ``None``.
            mask: ``[B, 1, T, S]`` attention mask replacing the causal one built from ``key_mask``. Without one,
                no cache and no padding, learned and rotary positions attend with SDPA's ``is_causal`` and no mask
                tensor: memory grows linearly with ``T`` where SDPA has a fused kernel (FlashAttention on GPU, the
                flash kernel on CPU), instead of the ``[B, 1, T, T]`` mask and the math path's ``[B, H, T, T]``
                scores. xPos still builds the causal mask for its blockwise decay. Telling "no padding" costs one
                host sync per forward (``key_mask.all()``).

        Returns:
            ``(hidden [B, T, D], new cache per layer)``: the last layer's output, before the final LN that
            :meth:`_logits` applies.
        """
        keys = positions if past is None else positions_from_mask(key_mask)
        x, rotation = self._positions(inputs_embeds.to(self.dtype), positions, keys)
        if mask is None and (past is not None or not bool(key_mask.all())):
            mask = attention_bias(key_mask, x.shape[1])
        caches = []  # mask None: no padding, no cache: plain causal attention (SDPA's is_causal, no [T, S] mask)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, mask, None if past is None else past[i], rotation)
            caches.append(cache)
        return x, caches

    def _positions(self, x: torch.Tensor, positions: torch.Tensor,
                   keys: torch.Tensor) -> tuple[torch.Tensor, Rotation | None]:
        """Add learned positions to ``x [B, T, D]``, or return the :class:`Rotation` of the relative ones
        (``positions [B, T]`` of the new tokens, ``keys [B, S]`` of all keys)."""
        if self.embed_positions is None:
            return x, Rotation(*self.relative.angles(positions), positions, keys, self.relative)
        if int(positions.max()) >= self.config["max_positions"]:
            raise ValueError(f"SubLNDecoder: position {int(positions.max())} >= max_positions="
                             f"{self.config['max_positions']}")
        return x + self.embed_positions(positions), None

    #: ``forward`` takes ``segment_ids`` / ``position_ids`` of packed rows.
    supports_packing = True

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced pass over ``inputs_embeds [B, T, D]`` with ``attention_mask [B, T]`` (any padding side).

        ``labels [B, T]`` are aligned with the inputs (position ``t`` predicts ``labels[:, t + 1]``),
        ``-100`` ignored. Returns ``logits [B, T, V]`` (computed when read) and the mean loss, whose head runs on
        the target positions only (:func:`~mmlm.losses.causal_head_loss`). Packed rows give
        ``segment_ids [B, T]`` (1, 2, … per sample, 0 on padding): attention stays inside each sample
        and positions restart (``position_ids [B, T]``, default from the segments).
        """
        if segment_ids is None:
            hidden, _ = self._decode(inputs_embeds, positions_from_mask(attention_mask), attention_mask)
        else:
            positions = segment_positions(segment_ids) if position_ids is None else position_ids
            mask = packed_causal_mask(segment_ids)[:, None]
            hidden, _ = self._decode(inputs_embeds, positions, attention_mask, mask=mask)
        loss = None if labels is None else causal_head_loss(hidden, self._logits, labels)
        return LMOutput(loss=loss, hidden=hidden, head=self._logits)

    # ------------------------------------------------------------------ generation

    def _prefill(self, inputs_embeds: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[LayerCache]]:
        """Encode the prompt: last-position ``logits [B, V]`` and the cache."""
        hidden, past = self._decode(inputs_embeds, positions_from_mask(attention_mask), attention_mask)
        return self._logits(hidden[:, -1:])[:, -1].float(), past

    def _step(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
              past: list[LayerCache]) -> tuple[torch.Tensor, torch.Tensor, list[LayerCache]]:
        """Feed ``tokens [B]`` after ``attention_mask [B, S]`` → ``(logits [B, V], mask [B, S + 1], cache)``."""
        positions = attention_mask.sum(-1, keepdim=True)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tokens), 1)], dim=1)
        hidden, past = self._decode(self.embed(tokens[:, None]), positions, attention_mask, past)
        return self._logits(hidden[:, -1:])[:, -1].float(), attention_mask, past

    def _process(self, logits: torch.Tensor, generated: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """Apply repetition penalty (on ``generated [B, t]``) and ``min_new_tokens`` to ``logits [B, V]``."""
        if config.repetition_penalty != 1.0 and generated.shape[1]:
            seen = logits.gather(1, generated)
            seen = torch.where(seen > 0, seen / config.repetition_penalty, seen * config.repetition_penalty)
            logits = logits.scatter(1, generated, seen)
        if generated.shape[1] < config.min_new_tokens:
            logits = logits.clone()
            logits[:, self.config["eos_token_id"]] = float("-inf")
        return logits

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig) -> torch.Tensor:
        """Greedy or sampled (``num_beams == 1``, :meth:`greedy_or_sample`) or beam search with a KV cache after
        left-padded ``inputs_embeds [B, T, D]``.

        Returns the new token ids ``[B, T_new]`` only, ``T_new <= config.max_new_tokens`` (shorter when
        every row ended with eos, which is kept); positions after a row's eos hold ``pad_token_id``.
        Runs in the current mode: call ``.eval()`` first unless dropout is wanted.
        """
        if config.num_beams > 1:
            return self.beam_search(inputs_embeds, attention_mask, config, config.num_beams)
        return self.greedy_or_sample(inputs_embeds, attention_mask, config)

    @torch.no_grad()
    def greedy_or_sample(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                         config: GenerationConfig) -> torch.Tensor:
        """One hypothesis per row: the most likely token at each step, or with ``config.do_sample`` a draw after
        temperature, top-k and top-p (:func:`mmlm.language.base.next_tokens`, torch's global generator);
        arguments and result as :meth:`generate`."""
        eos, pad = self.config["eos_token_id"], self.config["pad_token_id"]
        logits, past = self._prefill(inputs_embeds, attention_mask)
        generated = attention_mask.new_zeros(len(logits), 0, dtype=torch.long)
        done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        for step in range(config.max_new_tokens):
            tokens = next_tokens(self._process(logits, generated, config), config).masked_fill(done, pad)
            generated = torch.cat([generated, tokens[:, None]], dim=1)
            done |= tokens == eos
            if done.all() or step + 1 == config.max_new_tokens:
                break
            logits, attention_mask, past = self._step(tokens, attention_mask, past)
        return generated

    @torch.no_grad()
    def beam_search(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    config: GenerationConfig, num_beams: int) -> torch.Tensor:
        """Beam search keeping ``num_beams`` (K) hypotheses per row; result as :meth:`generate`.

        A beam that emitted eos stays in the beam with its score frozen (it only extends with pad at
        no cost); the best beam is picked at the end by ``score / length ** length_penalty``. With
        ``num_beams=1`` this is greedy search.
        """
        batch, k = inputs_embeds.shape[0], num_beams
        logits, past = self._prefill(inputs_embeds.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0))
        attention_mask = attention_mask.repeat_interleave(k, 0)
        scores = torch.full((batch, k), float("-inf"), device=logits.device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        generated = attention_mask.new_zeros(batch * k, 0, dtype=torch.long)
        done = torch.zeros(batch * k, dtype=torch.bool, device=logits.device)
        lengths = torch.zeros(batch * k, device=logits.device)
        for step in range(config.max_new_tokens):
            logp = self._beam_log_probs(self._process(logits, generated, config), done)
            flat = (scores[:, :, None] + logp.view(batch, k, -1)).flatten(1)
            scores, index = flat.topk(k, dim=1)
            source = (index // self.vocab_size + torch.arange(batch, device=index.device)[:, None] * k).flatten()
            tokens = (index % self.vocab_size).flatten()
            generated = torch.cat([generated[source], tokens[:, None]], dim=1)
            lengths = lengths[source] + (~done[source]).float()
            done = done[source] | (tokens == self.config["eos_token_id"])
            if done.all() or step + 1 == config.max_new_tokens:
                break
            past = [(key[source], value[source]) for key, value in past]
            logits, attention_mask, past = self._step(tokens, attention_mask[source], past)
        best = (scores / lengths.view(batch, k) ** config.length_penalty).argmax(1)
        return generated.view(batch, k, -1)[torch.arange(batch), best]

    def _beam_log_probs(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[B*K, V]``; a finished beam may only add pad, at log-prob 0."""
        logp = logits.log_softmax(-1)
        finished = torch.full_like(logp, float("-inf"))
        finished[:, self.config["pad_token_id"]] = 0.0
        return torch.where(done[:, None], finished, logp)

    # ------------------------------------------------------------------ vocabulary and files

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grow or shrink the token table (and untied head) to ``vocab_size`` rows, keeping the old rows.

        New rows are drawn like the initial ones; a frozen decoder stays frozen.
        """
        old = self.embed_tokens.weight
        keep = min(vocab_size, self.vocab_size)
        table = nn.Embedding(vocab_size, self.width, device=old.device, dtype=old.dtype)
        nn.init.normal_(table.weight, std=self.width ** -0.5)
        with torch.no_grad():
            table.weight[:keep] = old[:keep]
        self.embed_tokens = table
        if self.lm_head is not None:
            head = nn.Linear(self.width, vocab_size, bias=False, device=old.device, dtype=old.dtype)
            with torch.no_grad():
                head.weight[:keep] = self.lm_head.weight[:keep]
            self.lm_head = head
        self.config["vocab_size"] = vocab_size
        if self.frozen:
            freeze_(self)

    def save_pretrained(self, directory: str, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` (the architecture arguments) and ``model.safetensors`` to ``directory``; LoRA
        adapters are merged into the written weights (this decoder keeps them). ``state_dict``: this decoder's weights
        as gathered from FSDP2 shards, written instead of the module's own.

        Raises:
            ValueError: ``state_dict`` with LoRA adapters (merge them from a checkpoint with ``mmlm export``).
        """
        if state_dict is not None and self.lora is not None:
            raise ValueError("save_pretrained: LoRA adapters are merged from the module, not from a gathered state "
                             "dict; export the checkpoint with `mmlm export` instead")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        state = merge_lora_(copy.deepcopy(self)).state_dict() if self.lora is not None else self.state_dict()
        state = dict(state_dict) if state_dict is not None else state
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str, freeze: bool = False, dtype: str | None = None) -> SubLNDecoder:
        """Rebuild a decoder written by :meth:`save_pretrained` (strict: missing or extra weights raise).

        Weights keep their saved dtype unless ``dtype`` is given.
        """
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"SubLNDecoder.from_pretrained: no {CONFIG_NAME} in {directory}")
        state = load_file(str(path / WEIGHTS_NAME))
        saved_dtype = next(iter(state.values())).dtype
        model = cls(**json.loads((path / CONFIG_NAME).read_text()))
        model.to(saved_dtype).load_state_dict(state, strict=True)
        model.setup_freezing(freeze, dtype)
        return model
