"""Semi-causal language modelling (MetaLM, Hao et al. 2022): span sampling, docking, labels and masks.

A row of T decoder positions holds causal tokens and *non-causal spans*. Each span is encoded by a
bidirectional encoder (every token of the span sees the whole span), projected by a connector and
docked back at the span's own positions, so the causal decoder reads ``[causal…, h(span)…, causal…]``.
Tokens inside a span are never targets; the token right after a span is predicted at the span's last
position (paper Eq. 1). Spans are described by ``span_ids [B, T]``: 0 for a causal position, ``1..k``
for the positions of the row's k-th span (in reading order). Spans never overlap and never touch.

Shape legend: B batch, T decoder positions, K spans in the batch, L longest span, D width.
"""

from __future__ import annotations

import torch

from mmlm.attention_masks import causal_mask
from mmlm.fusion import splice
from mmlm.losses import IGNORE_INDEX

#: Placeholder id marking span positions for :func:`mmlm.fusion.splice` (never a real token id).
SPAN_SLOT = -1


def runs_to_span_ids(selected: torch.Tensor) -> torch.Tensor:
    """Number the contiguous runs of ``selected [B, T]`` (bool) per row: ``[B, T]`` long, 0 outside runs."""
    selected = selected.bool()
    previous = torch.nn.functional.pad(selected[:, :-1], (1, 0), value=False)
    starts = selected & ~previous
    return starts.long().cumsum(1) * selected


def _span_lengths(region: int, ratio: float, min_len: int, max_len: int, max_spans: int,
                  generator: torch.Generator | None) -> list[int]:
    """Lengths of spans covering ``round(ratio * region)`` positions (the *budget*), that fit in ``region`` with
    at least one causal position between spans.

    The number of spans is drawn uniformly among the counts whose spans can each be ``[min_len, max_len]``
    long (at most ``max_spans``), then the budget is split at random within those bounds. A budget shorter
    than ``min_len`` (a short row) becomes one span of the whole budget, so every row is encoded at ``ratio``
    whatever its length; a budget beyond ``max_spans * max_len`` is capped there.
    """
    budget = min(round(ratio * region), max_spans * max_len)
    if budget < 1:
        return []
    if budget < min_len:
        return [budget]
    fewest, most = -(-budget // max_len), min(max_spans, budget // min_len)
    if fewest > most:  # no count fits both bounds (max_len < 2 * min_len): keep max_len, split evenly
        return [budget // fewest + (k < budget % fewest) for k in range(fewest)]
    count = int(torch.randint(fewest, most + 1, (), generator=generator))
    lengths: list[int] = []
    for left in range(count, 0, -1):
        rest = budget - sum(lengths)
        low = max(min_len, rest - (left - 1) * max_len) if left > 1 else rest
        high = min(max_len, rest - (left - 1) * min_len)
        lengths.append(int(torch.randint(low, max(low, high) + 1, (), generator=generator)))
    while lengths and sum(lengths) + len(lengths) - 1 > region:
        lengths.pop()
    return lengths


def _place(lengths: list[int], region: int, generator: torch.Generator | None) -> list[tuple[int, int]]:
    """``(start, end)`` offsets in ``[0, region)`` of spans with ``lengths``: each span goes into a distinct
    slot between the ``region - sum(lengths)`` causal positions, so spans never touch."""
    causal = region - sum(lengths)
    slots = sorted(torch.randperm(causal + 1, generator=generator)[: len(lengths)].tolist())
    spans, offset = [], 0
    for slot, length in zip(slots, lengths):
        start = slot + offset
        spans.append((start, start + length))
        offset += length
    return spans


def sample_spans(region: torch.Tensor, ratio: float = 0.25, min_len: int = 1, max_len: int = 4,
                 max_spans: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random non-causal spans for semi-causal pretraining.

    Args:
        region: ``[B, T]`` bool, one contiguous run per row of positions that may be encoded (text after
            bos, before eos: the token after a span must exist, as it is the span's target).
        ratio: fraction of each row's region to encode (the paper: 25 %), also in rows too short for a
            ``min_len`` span (there one shorter span covers the fraction).
        min_len: shortest span (the paper: 64 tokens), unless the row's whole budget is shorter.
        max_len: longest span (the paper: 128 tokens).
        max_spans: at most this many spans per row.
        generator: random source (the global one when ``None``).

    Returns:
        ``span_ids [B, T]``: 0 causal, ``1..k`` the row's spans in reading order.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"sample_spans: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    span_ids = torch.zeros(region.shape, dtype=torch.long, device=region.device)
    for row, allowed in enumerate(region.bool()):
        where = allowed.nonzero().flatten().tolist()
        if not where:
            continue
        first, size = where[0], len(where)
        if where[-1] - first + 1 != size:
            raise ValueError(f"sample_spans: row {row}'s region is not one contiguous run (positions {where})")
        lengths = _span_lengths(size, ratio, min_len, max_len, max_spans, generator)
        for k, (start, end) in enumerate(_place(lengths, size, generator), start=1):
            span_ids[row, first + start:first + end] = k
    return span_ids


def sample_prefix_spans(region: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One span per row: a prefix of random length ``[0, n - 1]`` of the row's region of n positions
    (MetaLM's image-text pretraining: the image and a random text prefix are encoded, the rest predicted).

    ``region [B, T]`` as in :func:`sample_spans`; returns ``span_ids [B, T]`` (0 or 1).
    """
    span_ids = torch.zeros(region.shape, dtype=torch.long, device=region.device)
    for row, allowed in enumerate(region.bool()):
        where = allowed.nonzero().flatten()
        if len(where) > 1:
            length = int(torch.randint(0, len(where), (), generator=generator))
            span_ids[row, where[:length]] = 1
    return span_ids


def span_labels(labels: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """``labels [B, T]`` with ``-100`` on every span position: only causally predicted tokens are targets."""
    return labels.masked_fill(span_ids > 0, IGNORE_INDEX)


def pack_spans(input_ids: torch.Tensor, span_ids: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every span into one row of an encoder batch, in reading order (row by row, span by span).

    Args:
        input_ids: ``[B, T]``.
        span_ids: ``[B, T]`` (0 causal, ``1..k`` spans).
        pad_id: id for the right padding of short spans.

    Returns:
        ``tokens [K, L]`` and ``mask [K, L]`` (1 for real span tokens); ``K = 0`` gives ``[0, 0]`` tensors.
    """
    rows, order = [], []
    for row in range(input_ids.shape[0]):
        for k in span_ids[row].unique().tolist():
            if k > 0:
                rows.append(input_ids[row][span_ids[row] == k])
                order.append(row)
    width = max((len(r) for r in rows), default=0)
    tokens = input_ids.new_full((len(rows), width), pad_id)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    return tokens, mask


def dock(embeds: torch.Tensor, span_ids: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place the encoded spans back at their positions (count-checked by :func:`mmlm.fusion.splice`).

    Args:
        embeds: ``[B, T, D]`` token embeddings of the decoder.
        span_ids: ``[B, T]``; span order must be that of :func:`pack_spans`.
        encoded: ``[K, L, D]`` connector outputs of the packed spans.
        mask: ``[K, L]`` real positions of ``encoded``.

    Returns:
        ``[B, T, D]``: ``embeds`` with every span position replaced by its encoded vector.
    """
    slots = torch.where(span_ids > 0, SPAN_SLOT, 0)
    return splice(embeds, slots, SPAN_SLOT, encoded[mask.bool()])


def span_start(span_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: for a span position the position where its span starts, else the position itself."""
    positions = torch.arange(span_ids.shape[1], device=span_ids.device).expand_as(span_ids)
    previous = torch.nn.functional.pad(span_ids[:, :-1], (1, 0), value=0)
    starts = (span_ids > 0) & (span_ids != previous)
    latest_start = torch.where(starts, positions, 0).cummax(dim=1).values
    return torch.where(span_ids > 0, latest_start, positions)


def encoder_mask(span_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` bool, what the bidirectional encoders see: a span position sees its whole span
    (past and future), nothing else; causal positions are not encoded (all False)."""
    same = span_ids[:, :, None] == span_ids[:, None, :]
    return same & (span_ids[:, :, None] > 0)


def semicausal_mask(span_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` bool: which input tokens decoder position t depends on in semi-causal LM.

    The decoder is causal over the docked sequence (row t reads positions ``<= t``), and a docked vector
    carries its whole span, so row t depends on token j when ``j <= t`` or j's span starts at or before
    t. Padding keys (``attention_mask [B, T]`` 0) are never seen. Labels inside spans are ``-100``, so
    the look-ahead inside a span never reaches a target.
    """
    length = span_ids.shape[1]
    causal = causal_mask(length, span_ids.device)[None]
    docked = span_start(span_ids)[:, None, :] <= torch.arange(length, device=span_ids.device)[None, :, None]
    return (causal | (docked & (span_ids[:, None, :] > 0))) & attention_mask.bool()[:, None, :]
