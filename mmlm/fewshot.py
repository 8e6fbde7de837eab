"""Few-shot prompts built from the evaluation batch itself (Frozen, MetaLM).

For each query ``i`` of a :class:`~mmlm.batch.Batch`, up to ``shots`` support examples are the next examples of the
batch (cyclically) that show another image — questions about the query's own image would give its answers away —
and the row is, in the training token layout::

    [<image>×k  bos prompt target eos] × shots   [<image>×k  bos prompt]     (the query last)

Shape legend: B batch, k image slots per example, L row length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_lightning.utilities import rank_zero_warn

from mmlm.batch import Batch
from mmlm.losses import IGNORE_INDEX


def support_examples(pixels: torch.Tensor, query: int, shots: int) -> list[int]:
    """Up to ``shots`` indices after ``query`` (cyclically) whose image differs from the query's.

    Args:
        pixels: ``[B, 3, H, W]`` batch images.
        query: index of the query example.
        shots: support examples wanted.
    """
    size = pixels.shape[0]
    others = [(query + s) % size for s in range(1, size)]
    return [j for j in others if not torch.equal(pixels[j], pixels[query])][:shots]


@dataclass
class FewShotRows:
    """The few-shot rows of a batch, one per query.

    Attributes:
        ids: ``B`` rows of token ids ``[L_i]`` (``<image>`` slots, demonstrations, then the query's prompt).
        is_input: ``B`` bool rows ``[L_i]``: prompt tokens (the task input; MetaLM encodes them), not image slots,
            targets or eos.
        images: the batch index of the image filling each ``k``-slot group, in reading order over all rows.
    """

    ids: list[torch.Tensor]
    is_input: list[torch.Tensor]
    images: list[int]


def with_slots(ids: torch.Tensor, is_input: torch.Tensor, slots: int, image_token_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``slots`` ``<image>`` ids in front of ``ids [L]`` (not input: images are spliced in)."""
    image = ids.new_full((slots,), image_token_id)
    return torch.cat([image, ids]), torch.cat([torch.zeros(slots, dtype=torch.bool, device=ids.device), is_input])


def demonstration(batch: Batch, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, is_input)`` of example ``j``'s ``bos prompt target eos`` (the prompt is the input)."""
    real = batch.attention_mask[j].bool()
    return batch.input_ids[j][real], batch.labels[j][real] == IGNORE_INDEX


def query(batch: Batch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, is_input)`` of example ``i``'s ``bos prompt`` (all input)."""
    ids = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
    return ids, torch.ones_like(ids, dtype=torch.bool)


def few_shot_rows(batch: Batch, shots: int, slots: int, image_token_id: int) -> FewShotRows:
    """The ``shots``-shot row of every query of ``batch`` (see the module docstring); ``slots`` image slots per
    example. A query whose batch holds fewer than ``shots`` other images (a short last batch) gets fewer support
    examples, with a warning."""
    rows = FewShotRows([], [], [])
    for i in range(len(batch)):
        support = support_examples(batch.pixels, i, shots)
        if len(support) < shots:
            rank_zero_warn(f"few-shot evaluation: a batch of {len(batch)} gave a query only {len(support)} of "
                           f"{shots} support examples of other images (raise data.batch_size)")
        parts = [with_slots(*demonstration(batch, j), slots, image_token_id) for j in support]
        parts.append(with_slots(*query(batch, i), slots, image_token_id))
        rows.ids.append(torch.cat([ids for ids, _ in parts]))
        rows.is_input.append(torch.cat([flags for _, flags in parts]))
        rows.images += support + [i]
    return rows
