"""Mixture-of-Modality-Experts (MoME) transformer (VLMO, Bao et al. 2022).

One pre-norm transformer for three modes. Every block has one self-attention shared by all tokens, then
routes each token to a modality expert FFN (each expert with its own LayerNorm):

* ``"image"``: image tokens ``[CLS_img; patches]`` → V-FFN in every layer (a plain ViT);
* ``"text"``: text tokens → L-FFN in every layer (a BERT-like text encoder);
* ``"fusion"``: ``[text; image]`` in one sequence; layers below ``vl_start`` send text tokens to L-FFN and image
  tokens to V-FFN, layers from ``vl_start`` on send every token to VL-FFN.

Attention, patch embedding, class token, positions and the final norm follow timm's ViT names, so a timm
ViT maps onto the image path by renaming ``norm2``/``mlp`` to ``experts.v.norm``/``experts.v.mlp``
(:mod:`mmlm.convert.vlmo_timm`). Attention is timm's ``Attention`` (``scaled_dot_product_attention``).

Shape legend: B batch, N image tokens (1 + patches), P patches, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from timm.layers import Attention, Mlp, PatchEmbed, trunc_normal_
from torch import Tensor, nn

Mode = Literal["image", "text", "fusion"]
MODES: tuple[str, ...] = ("image", "text", "fusion")
LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's


@dataclass(frozen=True)
class MoMEConfig:
    """The MoME transformer's size as a VLMO config gives it (``transformer: {img_size: 64, dim: 64, …}``), checked
    key by key by the CLI; ``None`` keeps :class:`MoMETransformer`'s default (``vocab_size``: the tokenizer's)."""

    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qkv_bias: bool | None = None
    vl_start: int | None = None
    vocab_size: int | None = None
    max_text_len: int | None = None


class MoMEExpert(nn.Module):
    """One modality expert: ``mlp(norm(x))``, ``[B, L, D] → [B, L, D]`` (the residual is added by the block)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))


class MoMEBlock(nn.Module):
    """Shared self-attention, then a modality expert per token.

    Args:
        dim: D.
        num_heads: attention heads.
        mlp_ratio: expert hidden width / D.
        qkv_bias: bias on the qkv projection (timm ViT: True).
        with_vl: this block also has the vision-language expert (used for every token in fusion mode).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 with_vl: bool = False) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        names = ("v", "l", "vl") if with_vl else ("v", "l")
        self.experts = nn.ModuleDict({name: MoMEExpert(dim, int(dim * mlp_ratio)) for name in names})

    @property
    def with_vl(self) -> bool:
        return "vl" in self.experts

    def forward(self, x: Tensor, mode: Mode, attn_mask: Tensor | None = None, num_text: int = 0) -> Tensor:
        """``x [B, L, D]`` → ``[B, L, D]``.

        Args:
            mode: ``"image"`` (V-FFN), ``"text"`` (L-FFN) or ``"fusion"`` (``x = [text; image]``).
            attn_mask: optional bool ``[B, 1, 1 or L, L]``, True = may attend.
            num_text: T, the leading text tokens of a fusion sequence (routed to L-FFN below ``vl_start``).
        """
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.route(x, mode, num_text)

    def route(self, x: Tensor, mode: Mode, num_text: int) -> Tensor:
        """The expert outputs ``[B, L, D]`` for the tokens of ``x`` (before the residual)."""
        if mode == "image":
            return self.experts["v"](x)
        if mode == "text":
            return self.experts["l"](x)
        if mode != "fusion":
            raise ValueError(f"MoME mode {mode!r} is not one of {MODES}")
        if self.with_vl:
            return self.experts["vl"](x)
        return torch.cat([self.experts["l"](x[:, :num_text]), self.experts["v"](x[:, num_text:])], dim=1)


@dataclass
class MoMEOutput:
    """Final-norm hidden states: ``text [B, T, D]`` and/or ``image [B, N, D]`` (``None`` when not in the input).

    In fusion mode both come from one sequence; position 0 of each is its ``[CLS]``.
    """

    text: Tensor | None
    image: Tensor | None


class MoMETransformer(nn.Module):
    """VLMO's backbone: image and text embeddings + MoME blocks + final norm.

    Args:
        img_size: square input side.
        patch_size: ViT patch side.
        in_chans: image channels.
        dim: D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: expert hidden width / D.
        qkv_bias: bias on qkv.
        vl_start: first block with a VL-FFN (fusion mode uses it from here on); ``depth`` for none.
        vocab_size: V of the text embedding.
        max_text_len: learned text positions.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, vl_start: int = 10,
                 vocab_size: int = 30522, max_text_len: int = 40) -> None:
        super().__init__()
        if not 0 <= vl_start <= depth:
            raise ValueError(f"MoMETransformer: vl_start={vl_start} must lie in [0, depth={depth}]")
        self.dim, self.depth, self.vl_start, self.patch_size = dim, depth, vl_start, patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # replaces masked patches (masked image modelling)
        self.word_embed = nn.Embedding(vocab_size, dim)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, max_text_len, dim))
        self.blocks = nn.ModuleList(MoMEBlock(dim, num_heads, mlp_ratio, qkv_bias, with_vl=i >= vl_start)
                                    for i in range(depth))
        self.norm = LayerNorm(dim)
        self.reset_parameters()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def max_text_len(self) -> int:
        return self.text_pos_embed.shape[1]

    def reset_parameters(self) -> None:
        """timm ViT's initialisation: truncated normal (0.02) weights, zero biases, tiny class token."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                trunc_normal_(module.weight, std=0.02)
        for param in (self.pos_embed, self.text_pos_embed, self.mask_token):
            trunc_normal_(param, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay (read by :func:`mmlm.models.base.declared_no_decay`)."""
        return {"cls_token", "pos_embed", "mask_token", "text_pos_embed"}

    def embed_image(self, pixels: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """``pixels [B, 3, H, W]`` → ``[B, 1 + P, D]``; patches where ``patch_mask [B, P]`` is True become the
        mask token (before positions are added, as in SimMIM/BEiT)."""
        x = self.patch_embed(pixels)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def embed_text(self, ids: Tensor) -> Tensor:
        """``ids [B, T]`` (T ≤ ``max_text_len``) → ``[B, T, D]`` word + position embeddings."""
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"{ids.shape[1]} text tokens exceed max_text_len={self.max_text_len}")
        return self.word_embed(ids) + self.text_pos_embed[:, : ids.shape[1]]

    def run_blocks(self, x: Tensor, mode: Mode, key_mask: Tensor | None = None, num_text: int = 0) -> Tensor:
        """Blocks + final norm over ``x [B, L, D]``; ``key_mask [B, L]`` (1 = real token) hides padding."""
        attn_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mode, attn_mask, num_text)
        return self.norm(x)

    def forward(self, mode: Mode, pixels: Tensor | None = None, text_ids: Tensor | None = None,
                text_mask: Tensor | None = None, patch_mask: Tensor | None = None) -> MoMEOutput:
        """Run one mode.

        Args:
            mode: ``"image"`` needs ``pixels``; ``"text"`` needs ``text_ids``; ``"fusion"`` needs both.
            pixels: ``[B, 3, H, W]``.
            text_ids: ``[B, T]`` with ``[CLS]`` first, right-padded.
            text_mask: ``[B, T]`` 1 for real tokens (default: all real).
            patch_mask: ``[B, P]`` bool, patches replaced by the mask token.

        Returns:
            :class:`MoMEOutput` with ``text [B, T, D]`` and/or ``image [B, 1 + P, D]``.
        """
        if mode not in MODES:
            raise ValueError(f"MoME mode {mode!r} is not one of {MODES}")
        if (mode != "text" and pixels is None) or (mode != "image" and text_ids is None):
            raise ValueError(f"MoME mode {mode!r} needs pixels for image/fusion and text_ids for text/fusion; got "
                             f"pixels={pixels is not None}, text_ids={text_ids is not None}")
        if mode == "image":
            return MoMEOutput(None, self.run_blocks(self.embed_image(pixels, patch_mask), "image"))
        text = self.embed_text(text_ids)
        mask = torch.ones_like(text_ids) if text_mask is None else text_mask
        if mode == "text":
            return MoMEOutput(self.run_blocks(text, "text", mask), None)
        image = self.embed_image(pixels, patch_mask)
        full_mask = torch.cat([mask, mask.new_ones(image.shape[:2])], dim=1)
        x = self.run_blocks(torch.cat([text, image], dim=1), "fusion", full_mask, text.shape[1])
        return MoMEOutput(x[:, : text.shape[1]], x[:, text.shape[1]:])
