"""Where modality embeddings meet text: one splice routine (prefix is its special case).

Shape legend: B batch, T text tokens, K modality items (images), M embeddings per item, D width.
"""

from __future__ import annotations

import torch
from torch import nn


def splice(text_embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int,
           modality_embeds: torch.Tensor) -> torch.Tensor:
    """Place modality embeddings at the positions of a placeholder token.

    Placeholders are filled in reading order (row by row, left to right) with the ``K * M``
    vectors of ``modality_embeds`` taken in order, so item ``k`` fills the ``k``-th run of
    ``M`` placeholders.

    Args:
        text_embeds: ``[B, T, D]`` embeddings of ``input_ids``.
        input_ids: ``[B, T]`` token ids holding ``K * M`` placeholders in all.
        placeholder_id: the id that marks a slot.
        modality_embeds: ``[K, M, D]`` (or ``[K * M, D]``).

    Returns:
        ``[B, T, D]``: ``text_embeds`` with the slots replaced (differentiable in both inputs).

    Raises:
        ValueError: the number of placeholders differs from the number of embeddings.
    """
    slots = input_ids == placeholder_id
    flat = modality_embeds.reshape(-1, modality_embeds.shape[-1])
    n_slots = int(slots.sum())
    if n_slots != flat.shape[0]:
        raise ValueError(
            f"splice: input_ids hold {n_slots} placeholder tokens (id {placeholder_id}) but "
            f"{flat.shape[0]} embeddings were given (modality_embeds of shape {tuple(modality_embeds.shape)})"
        )
    out = text_embeds.clone()
    out[slots] = flat.to(out.dtype)
    return out


def prepend_placeholders(input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholder_id: int,
                         count: int, labels: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put ``count`` placeholder tokens in front of every row (the prefix case of :func:`splice`).

    Left padding stays on the left: rows are re-packed so that padding comes first, then the
    placeholders, then the row's tokens. Right-padded rows keep their padding on the right.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` 1 for real tokens.
        placeholder_id: the id of the slot token.
        count: ``M`` placeholders per row.
        labels: optional ``[B, T]``; placeholders get ``-100``.

    Returns:
        ``input_ids [B, M + T]``, ``attention_mask [B, M + T]``, ``labels [B, M + T]`` or ``None``.
    """
    b = input_ids.shape[0]
    slots = input_ids.new_full((b, count), placeholder_id)
    ids = torch.cat([slots, input_ids], dim=1)
    mask = torch.cat([torch.ones_like(slots, dtype=attention_mask.dtype), attention_mask], dim=1)
    new_labels = None if labels is None else torch.cat([torch.full_like(slots, -100), labels], dim=1)
    left_padded = attention_mask.shape[1] > 0 and bool((attention_mask[:, 0] == 0).any())
    if left_padded:
        order = torch.argsort(mask, dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        new_labels = None if new_labels is None else new_labels.gather(1, order)
    return ids, mask, new_labels


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-d id tensors of different lengths, padding on the left (for generation).

    Returns:
        ``ids [B, T_max]`` and ``attention_mask [B, T_max]`` (1 for real tokens).
    """
    width = max(len(r) for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def move_to_front(values: torch.Tensor, keep: torch.Tensor, fill: int, min_width: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens of each row of ``values [B, T]`` (``keep [B, T]`` bool) moved to the front, in order →
    ``(values [B, T'], kept [B, T'] bool)``, right-filled with ``fill``; ``T'`` the longest kept row (at least
    ``min_width``)."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    width = max(min_width, int(keep.sum(1).max()))
    kept = keep.gather(1, order)[:, :width]
    return values.gather(1, order)[:, :width].masked_fill(~kept, fill), kept


def targets_only(labels: torch.Tensor) -> torch.Tensor:
    """``labels [B, T]`` (``-100`` on prompt and padding) → decoder labels ``[B, T']``: each row's target
    tokens moved to the front, ``-100`` after, ``T'`` the longest target."""
    return move_to_front(labels, labels != -100, -100)[0]


@torch.no_grad()
def output_tokens(module: nn.Module, *shape: int) -> int:
    """How many tokens ``module`` (a connector) makes of one input of ``shape``: the length M of its span."""
    probe = next(module.parameters(), None)
    return module(torch.zeros(1, *shape, dtype=probe.dtype if probe is not None else None)).shape[1]
