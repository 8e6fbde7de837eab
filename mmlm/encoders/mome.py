"""Mixture-of-Modality-Experts (MoME) transformer (VLMO, Bao et al. 2022).

One pre-norm transformer for three modes. Every block has one self-attention shared by all tokens, then
routes each token to a modality expert FFN (each expert with its own LayerNorm):

* ``"image"``: image tokens ``[CLS_img; patches]`` → V-FFN in every layer (a plain ViT);
* ``"text"``: text tokens → L-FFN in every layer (a BERT-like text encoder);
* ``"fusion"``: ``[text; image]`` in one sequence; layers below ``vl_start`` send text tokens to L-FFN and image
  tokens to V-FFN, layers from ``vl_start`` on send every token to VL-FFN.

As unilm's ``vlmo/modules/multiway_transformer.py`` + ``vlmo_module.py`` (the defaults): layer scale on both
residual branches (``ls1``/``ls2``, ``layer_scale_init=0.1``), a relative position bias per layer read from one
table (:class:`MultiwayRelPosBias`: 2-D for patches, 1-D for text, one bucket per cross direction) and
modality-type embeddings (text 0, image 1) added to the inputs. Each is a named option, off for a plain ViT.

Attention, patch embedding, class token, positions and the final norm follow timm's ViT names, so a timm
ViT maps onto the image path by renaming ``norm2``/``mlp`` to ``experts.v.norm``/``experts.v.mlp``
(:mod:`mmlm.convert.vlmo_timm`). Attention is timm's ``Attention`` (``scaled_dot_product_attention``; the
relative position bias and the padding mask travel as one additive ``attn_mask``).

Shape legend: B batch, N image tokens (1 + patches), P patches, T text tokens, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from timm.layers import Attention, LayerScale, Mlp, PatchEmbed, trunc_normal_
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
    layer_scale_init: float | None = None
    rel_pos_bias: bool | None = None
    modality_type_embed: bool | None = None


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
        layer_scale_init: initial value of the per-channel scales ``ls1``/``ls2`` of the attention and expert
            branches (unilm's ``gamma_1``/``gamma_2``, ``layer_scale_init_values``); 0: no layer scale.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 with_vl: bool = False, layer_scale_init: float = 0.1) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        names = ("v", "l", "vl") if with_vl else ("v", "l")
        self.experts = nn.ModuleDict({name: MoMEExpert(dim, int(dim * mlp_ratio)) for name in names})
        scale = (lambda: LayerScale(dim, layer_scale_init)) if layer_scale_init else nn.Identity
        self.ls1, self.ls2 = scale(), scale()

    @property
    def with_vl(self) -> bool:
        return "vl" in self.experts

    def forward(self, x: Tensor, mode: Mode, attn_mask: Tensor | None = None, num_text: int = 0) -> Tensor:
        """``x [B, L, D]`` → ``[B, L, D]``.

        Args:
            mode: ``"image"`` (V-FFN), ``"text"`` (L-FFN) or ``"fusion"`` (``x = [text; image]``).
            attn_mask: optional bool ``[B, 1, 1 or L, L]`` (True = may attend) or additive float
                ``[B or 1, H, L, L]`` (relative position bias, ``-inf`` at padding).
            num_text: T, the leading text tokens of a fusion sequence (routed to L-FFN below ``vl_start``).
        """
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.ls2(self.route(x, mode, num_text))

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


def image_relative_index(grid: int) -> Tensor:
    """BEiT's (and unilm VLMO's) bucket of each pair of ``[CLS_img; grid × grid patches]`` → ``[N, N]`` long, N = 1 +
    grid²: patch pairs by their 2-D offset in ``[0, (2·grid − 1)²)``, then three buckets for CLS → patch,
    patch → CLS and CLS → CLS."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)  # [2, P]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)  # [P, P, 2], each in [0, 2g-2]
    span = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :], index[:, 0], index[0, 0] = span, span + 1, span + 2
    return index


def text_relative_index(max_len: int, offset: int) -> Tensor:
    """unilm VLMO's text buckets from ``offset`` on → ``[max_len, max_len]`` long: token pairs after ``[CLS]`` by
    their offset ``j − i`` in ``[offset, offset + 2·max_len − 3]``, then CLS → token, token → CLS, CLS → CLS."""
    pos = torch.arange(max_len - 1)
    index = torch.zeros(max_len, max_len, dtype=torch.long)
    index[1:, 1:] = pos[None, :] - pos[:, None] + (max_len - 2) + offset
    end = offset + 2 * max_len
    index[0, :], index[:, 0], index[0, 0] = end - 3, end - 2, end - 1
    return index


class MultiwayRelPosBias(nn.Module):
    """Relative position bias of every block, as unilm's ``VLMo.build_relative_position_embed``/``get_rel_pos_bias``:
    one table ``[buckets, depth · H]`` (zeros at start), so each block has its own bias per head. Buckets: image pairs
    (:func:`image_relative_index`), text → image, image → text, text pairs (:func:`text_relative_index`).

    Args:
        grid: patches per image side.
        max_text_len: T_max (the text buckets cover offsets up to ``T_max − 2``).
        num_heads: H.
        depth: number of blocks.
    """

    def __init__(self, grid: int, max_text_len: int, num_heads: int, depth: int) -> None:
        super().__init__()
        image = image_relative_index(grid)
        self.text_to_image = int(image.max()) + 1
        self.image_to_text = self.text_to_image + 1
        text = text_relative_index(max_text_len, self.image_to_text + 1)
        self.depth, self.num_heads = depth, num_heads
        self.table = nn.Parameter(torch.zeros(int(text.max()) + 1, depth * num_heads))
        self.register_buffer("image_index", image, persistent=False)
        self.register_buffer("text_index", text, persistent=False)

    def index(self, num_text: int, num_image: int) -> Tensor:
        """Buckets ``[L, L]`` of a sequence ``[text (T = num_text); image (N = num_image)]`` (either may be 0)."""
        if num_image and num_image != self.image_index.shape[0]:
            raise ValueError(f"relative position bias: {num_image} image tokens, built for {self.image_index.shape[0]}")
        text = self.text_index[:num_text, :num_text]
        if not num_image:
            return text
        if not num_text:
            return self.image_index
        top = torch.cat([text, text.new_full((num_text, num_image), self.text_to_image)], dim=1)
        bottom = torch.cat([text.new_full((num_image, num_text), self.image_to_text), self.image_index], dim=1)
        return torch.cat([top, bottom], dim=0)

    def forward(self, num_text: int, num_image: int) -> Tensor:
        """``[depth, H, L, L]`` additive attention biases for ``[text; image]``, L = T + N."""
        index = self.index(num_text, num_image)
        bias = self.table[index]  # [L, L, depth · H]
        return bias.permute(2, 0, 1).reshape(self.depth, self.num_heads, *index.shape)


@dataclass
class MoMEOutput:
    """Final-norm hidden states: ``text [B, T, D]`` and/or ``image [B, N, D]`` (``None`` when not in the input).

    In fusion mode both come from one sequence; position 0 of each is its ``[CLS]``.
    """

    text: Tensor | None
    image: Tensor | None


@dataclass
class MoMEBranches:
    """An image-only or text-only pass split at ``vl_start`` (unilm's ``infer_image``/``infer_text``), final-norm
    hidden states ``[B, L, D]``: ``expert`` ran the modality's own experts in every block, ``vl`` ran the blocks
    from ``vl_start`` on with the VL-FFN instead (the ``cls_vlffn_feats`` of unilm's ITC)."""

    expert: Tensor
    vl: Tensor


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
        layer_scale_init: initial layer scale of every block (unilm VLMO-Base: 0.1); 0: none (a plain ViT).
        rel_pos_bias: a relative position bias per block (:class:`MultiwayRelPosBias`, as unilm).
        modality_type_embed: add a learned type embedding to every input token, text 0 and image 1 (unilm's
            ``token_type_embeddings``).

    The absolute position tables (``pos_embed``, ``text_pos_embed``) stay in every setting (a timm ViT initialises
    ``pos_embed``); unilm's VLMO-Base has none beside its relative bias (``docs/vlmo.md``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, vl_start: int = 10,
                 vocab_size: int = 30522, max_text_len: int = 40, layer_scale_init: float = 0.1,
                 rel_pos_bias: bool = True, modality_type_embed: bool = True) -> None:
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
        self.token_type_embed = nn.Embedding(2, dim) if modality_type_embed else None
        grid = self.patch_embed.grid_size
        if rel_pos_bias and grid[0] != grid[1]:
            raise ValueError(f"MoMETransformer: the relative position bias needs a square patch grid, got {grid}")
        self.rel_pos_bias = MultiwayRelPosBias(grid[0], max_text_len, num_heads, depth) if rel_pos_bias else None
        self.blocks = nn.ModuleList(MoMEBlock(dim, num_heads, mlp_ratio, qkv_bias, with_vl=i >= vl_start,
                                              layer_scale_init=layer_scale_init) for i in range(depth))
        self.norm = LayerNorm(dim)
        self.reset_parameters()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def max_text_len(self) -> int:
        return self.text_pos_embed.shape[1]

    def reset_parameters(self) -> None:
        """timm ViT's initialisation: truncated normal (0.02) weights, zero biases, tiny class token; layer scales
        at their initial value and the relative position table at zero (as unilm)."""
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
        """Parameters without weight decay (read by :func:`mmlm.models.base.declared_no_decay`); the relative
        position table as BEiT's, so buckets a stage never reads (the image rows in text-only stage 2) stay put."""
        return {"cls_token", "pos_embed", "mask_token", "text_pos_embed", "rel_pos_bias.table"}

    def embed_image(self, pixels: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """``pixels [B, 3, H, W]`` → ``[B, 1 + P, D]``; patches where ``patch_mask [B, P]`` is True become the
        mask token (before positions are added, as in SimMIM/BEiT). No modality-type embedding (:meth:`typed`)."""
        x = self.patch_embed(pixels)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def embed_text(self, ids: Tensor) -> Tensor:
        """``ids [B, T]`` (T ≤ ``max_text_len``) → ``[B, T, D]`` word + position embeddings (no type: :meth:`typed`)."""
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"{ids.shape[1]} text tokens exceed max_text_len={self.max_text_len}")
        return self.word_embed(ids) + self.text_pos_embed[:, : ids.shape[1]]

    def typed(self, x: Tensor, modality: int) -> Tensor:
        """``x [B, L, D]`` plus the modality-type embedding (0 text, 1 image); ``x`` itself without them."""
        return x if self.token_type_embed is None else x + self.token_type_embed.weight[modality]

    def attention_masks(self, key_mask: Tensor | None, num_text: int, num_image: int) -> list[Tensor | None]:
        """Per block: ``None`` (nothing to mask), the padding mask as bool ``[B, 1, 1, L]``, or with the relative
        position bias one additive float ``[B or 1, H, L, L]`` (``-inf`` at padded keys)."""
        keys = None if key_mask is None else key_mask.bool()[:, None, None, :]
        if self.rel_pos_bias is None:
            return [keys] * self.depth
        biases = self.rel_pos_bias(num_text, num_image)  # [depth, H, L, L]
        if keys is not None:
            biases = biases[:, None].masked_fill(~keys, float("-inf"))  # [depth, B, H, L, L]
        else:
            biases = biases[:, None]
        return list(biases.unbind(0))

    def run_blocks(self, x: Tensor, mode: Mode, masks: list[Tensor | None], num_text: int = 0, start: int = 0,
                   stop: int | None = None) -> Tensor:
        """Blocks ``start`` … ``stop − 1`` over ``x [B, L, D]`` (no final norm); ``masks`` from
        :meth:`attention_masks`."""
        for i in range(start, self.depth if stop is None else stop):
            x = self.blocks[i](x, mode, masks[i].to(x.dtype) if _is_bias(masks[i]) else masks[i], num_text)
        return x

    def unimodal_inputs(self, mode: Mode, pixels: Tensor | None, text_ids: Tensor | None,
                        text_mask: Tensor | None, patch_mask: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
        """Typed embeddings ``[B, L, D]`` and per-block masks of an image-only or text-only pass."""
        if mode == "image":
            x = self.typed(self.embed_image(pixels, patch_mask), 1)
            return x, self.attention_masks(None, 0, x.shape[1])
        x = self.typed(self.embed_text(text_ids), 0)
        mask = torch.ones_like(text_ids) if text_mask is None else text_mask
        return x, self.attention_masks(mask, x.shape[1], 0)

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
        check_inputs(mode, pixels, text_ids)
        if mode != "fusion":
            x, masks = self.unimodal_inputs(mode, pixels, text_ids, text_mask, patch_mask)
            x = self.norm(self.run_blocks(x, mode, masks))
            return MoMEOutput(None, x) if mode == "image" else MoMEOutput(x, None)
        text = self.typed(self.embed_text(text_ids), 0)
        image = self.typed(self.embed_image(pixels, patch_mask), 1)
        mask = torch.ones_like(text_ids) if text_mask is None else text_mask
        full_mask = torch.cat([mask, mask.new_ones(image.shape[:2])], dim=1)
        masks = self.attention_masks(full_mask, text.shape[1], image.shape[1])
        x = self.norm(self.run_blocks(torch.cat([text, image], dim=1), "fusion", masks, text.shape[1]))
        return MoMEOutput(x[:, : text.shape[1]], x[:, text.shape[1]:])

    def branches(self, mode: Literal["image", "text"], pixels: Tensor | None = None, text_ids: Tensor | None = None,
                 text_mask: Tensor | None = None) -> MoMEBranches:
        """An image-only or text-only pass and its VL-FFN branch from ``vl_start`` on (unilm's ``infer_image`` /
        ``infer_text``, whose ``cls_vlffn_feats`` ITC also contrasts) → :class:`MoMEBranches` ``[B, L, D]`` each.

        Raises:
            ValueError: ``mode`` is fusion, or the transformer has no VL-FFN (``vl_start == depth``).
        """
        if mode not in ("image", "text") or self.vl_start >= self.depth:
            raise ValueError(f"MoME branches need mode image or text (got {mode!r}) and a VL-FFN "
                             f"(vl_start={self.vl_start}, depth={self.depth})")
        check_inputs(mode, pixels, text_ids)
        x, masks = self.unimodal_inputs(mode, pixels, text_ids, text_mask, None)
        below = self.run_blocks(x, mode, masks, stop=self.vl_start)
        expert = self.run_blocks(below, mode, masks, start=self.vl_start)
        vl = self.run_blocks(below, "fusion", masks, start=self.vl_start)  # every block from vl_start has a VL-FFN
        return MoMEBranches(self.norm(expert), self.norm(vl))


def _is_bias(mask: Tensor | None) -> bool:
    return mask is not None and mask.is_floating_point()


def check_inputs(mode: str, pixels: Tensor | None, text_ids: Tensor | None) -> None:
    """Raise ``ValueError`` naming the mode when it is unknown or lacks its inputs."""
    if mode not in MODES:
        raise ValueError(f"MoME mode {mode!r} is not one of {MODES}")
    if (mode != "text" and pixels is None) or (mode != "image" and text_ids is None):
        raise ValueError(f"MoME mode {mode!r} needs pixels for image/fusion and text_ids for text/fusion; got "
                         f"pixels={pixels is not None}, text_ids={text_ids is not None}")
