"""Few-shot prompts built from the evaluation batch itself (Frozen, MetaLM, any prefix family), in the data layer.

For each query ``i`` of a :class:`~mmlm.batch.SentenceBatch`, up to ``shots`` support examples are the next examples
of the batch (cyclically) that show another image — questions about the query's own image would give its answers away
— and its prompt becomes, in the training token layout::

    [<image>×M  bos prompt target eos] × shots   [<image>×M  bos prompt]     (the query last)

The demonstrations' targets are recorded in ``prompt_labels`` (MetaLM encodes the task inputs, not the answers).
Shape legend: B batch, M image placeholders per example, P prompt tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pytorch_lightning.utilities import rank_zero_warn

from mmlm.batch import SentenceBatch
from mmlm.fusion import left_pad
from mmlm.losses import IGNORE_INDEX
from mmlm.sentences import Span


def support_examples(images: torch.Tensor, query: int, shots: int) -> list[int]:
    """Up to ``shots`` indices after ``query`` (cyclically) whose image differs from the query's.

    Args:
        images: ``[B, ...]`` the batch's images (pixels, or cached features), one per example.
        query: index of the query example.
        shots: support examples wanted.
    """
    size = images.shape[0]
    others = [(query + s) % size for s in range(1, size)]
    return [j for j in others if not torch.equal(images[j], images[query])][:shots]


Part = tuple[torch.Tensor, torch.Tensor, list[Span]]


def demonstration(batch: SentenceBatch, j: int) -> Part:
    """``(ids, labels, spans)`` of example ``j``'s whole sentence ``<image>×M bos prompt target eos`` (right-padded:
    its real tokens come first)."""
    n = int(batch.attention_mask[j].sum())
    return batch.input_ids[j, :n], batch.labels[j, :n], list(batch.spans[j])


def query(batch: SentenceBatch, i: int) -> Part:
    """``(ids, labels, spans)`` of example ``i``'s prompt ``<image>×M bos prompt`` (no targets)."""
    n = int(batch.prompt_mask[i].sum())
    ids = batch.prompt_ids[i, batch.prompt_ids.shape[1] - n:]
    pad = batch.prompt_ids.shape[1] - n
    return ids, torch.full_like(ids, IGNORE_INDEX), [s.shifted(-pad) for s in batch.prompt_spans[i]]


def joined(parts: list[Part]) -> Part:
    """The parts one after another, spans moved to their new positions."""
    spans, offset = [], 0
    for ids, _, part_spans in parts:
        spans += [s.shifted(offset) for s in part_spans]
        offset += len(ids)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), spans


def with_demonstrations(batch: SentenceBatch, shots: int, pad_id: int) -> SentenceBatch:
    """``batch`` with every prompt preceded by ``shots`` demonstrations (see the module docstring): new left-padded
    ``prompt_ids``/``prompt_mask``/``prompt_labels [B, P']`` and ``prompt_spans`` (items stay the batch's images).
    A query whose batch holds fewer than ``shots`` other images (a short last batch) gets fewer, with a warning."""
    images = batch.features if batch.features is not None else batch.images
    rows = []
    for i in range(len(batch)):
        support = support_examples(images, i, shots)
        if len(support) < shots:
            rank_zero_warn(f"few-shot evaluation: a batch of {len(batch)} gave a query only {len(support)} of "
                           f"{shots} support examples of other images (raise data.batch_size)")
        rows.append(joined([demonstration(batch, j) for j in support] + [query(batch, i)]))
    prompt_ids, prompt_mask = left_pad([r[0] for r in rows], pad_id)
    prompt_labels, _ = left_pad([r[1] for r in rows], IGNORE_INDEX)
    width = prompt_ids.shape[1]
    spans = [[s.shifted(width - len(r[0])) for s in r[2]] for r in rows]
    return replace(batch, prompt_ids=prompt_ids, prompt_mask=prompt_mask, prompt_labels=prompt_labels,
                   prompt_spans=spans)
