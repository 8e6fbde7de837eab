"""Masking for masked language modelling (BERT 80/10/10, optionally whole-word) and masked image modelling (patch selection, targets).

Shape legend: B batch, T text tokens, P patches, p patch side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmlm.losses import IGNORE_INDEX


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, device=device)


def word_starts(continuation: Tensor) -> Tensor:
    """``[B, T]`` long: for each position, the index of the first piece of its word. ``continuation [B, T]`` bool
    marks pieces that continue the previous one (WordPiece ``##…``); position 0 always starts a word."""
    positions = torch.arange(continuation.shape[1], device=continuation.device).expand_as(continuation)
    starts = ~continuation.bool()
    starts[:, 0] = True
    return torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values


def choose_mlm_positions(maskable: Tensor, prob: float, generator: torch.Generator | None = None,
                         continuation: Tensor | None = None) -> Tensor:
    """``[B, T]`` bool: each maskable position chosen with probability ``prob``, and at least one per row that
    has any maskable position (so every caption contributes to the loss).

    With ``continuation [B, T]`` (True on WordPiece ``##`` pieces) the draw is per word (whole-word masking, as
    BERT's and unilm VLMO's ``DataCollatorForWholeWordMask``): every maskable piece of a chosen word is chosen.
    """
    if not 0 < prob <= 1:
        raise ValueError(f"mlm probability must be in (0, 1], got {prob}")
    scores = _rand(maskable.shape, generator, maskable.device)
    if continuation is not None:
        scores = scores.gather(1, word_starts(continuation))  # each piece takes its word's draw
    scores = scores.masked_fill(~maskable, 2.0)
    chosen = (scores < prob) & maskable
    lowest = scores.min(dim=1, keepdim=True).values
    forced = (scores == lowest) & maskable  # the word (or token) with the lowest draw
    return chosen | forced


def mask_tokens(ids: Tensor, maskable: Tensor, mask_token_id: int, vocab_size: int, prob: float = 0.15,
                generator: torch.Generator | None = None,
                continuation: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BERT masking of ``ids [B, T]``.

    Positions where ``maskable [B, T]`` is True (real, non-special tokens) are chosen with probability ``prob``
    (at least one per row; per whole word when ``continuation [B, T]`` marks WordPiece ``##`` pieces:
    :func:`choose_mlm_positions`); of those 80 % become ``mask_token_id``, 10 % a random id in
    ``[0, vocab_size)``, 10 % stay (per piece, as Hugging Face's whole-word collator). Returns
    ``(masked_ids [B, T], labels [B, T])`` with labels ``-100`` off the chosen positions.
    """
    chosen = choose_mlm_positions(maskable.bool(), prob, generator, continuation)
    draw = _rand(ids.shape, generator, ids.device)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
    return masked, ids.masked_fill(~chosen, IGNORE_INDEX)


def random_patch_mask(batch_size: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
    """``[B, P]`` bool with exactly ``round(ratio * P)`` (at least 1) True patches per row, chosen uniformly."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    count = max(1, round(ratio * num_patches))
    order = torch.rand(batch_size, num_patches, generator=generator, device=device).argsort(dim=1)
    return order < count


def block_patch_mask(batch_size: int, grid: int, block: int, ratio: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """SimMIM's masking: the ``grid × grid`` patches are cut into ``block × block`` squares (``block`` divides
    ``grid``) and ``round(ratio · squares)`` squares are masked → ``[B, grid²]`` bool."""
    if grid % block:
        raise ValueError(f"mask block {block} must divide the patch grid {grid}")
    coarse = grid // block
    squares = random_patch_mask(batch_size, coarse * coarse, ratio, generator).reshape(batch_size, coarse, coarse)
    return squares.repeat_interleave(block, 1).repeat_interleave(block, 2).reshape(batch_size, grid * grid)


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """``pixels [B, C, H, W]`` → ``[B, P, p·p·C]`` in the row-major patch order of a ViT's patch embedding."""
    b, c, h, w = pixels.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}×{w} is not divisible into {patch_size}-pixel patches")
    x = pixels.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def masked_patch_regression_loss(prediction: Tensor, target: Tensor, patch_mask: Tensor) -> Tensor:
    """SimMIM's loss: mean L1 between ``prediction`` and ``target [B, P, p·p·C]`` over the masked patches only."""
    error = (prediction.float() - target.float()).abs().mean(dim=-1)  # [B, P]
    weights = patch_mask.float()
    return (error * weights).sum() / weights.sum().clamp(min=1)
