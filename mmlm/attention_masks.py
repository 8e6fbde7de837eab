"""Boolean self-attention masks (True = may attend), shared by the Q-Former, VLMO and MetaLM.

Shape legend: B batch, M query tokens, T text tokens. The BLIP-2 stage-1 masks cover the joint
sequence ``[queries; text]`` of length ``L = M + T`` and return ``[B, L, L]`` (row = the position
that attends, column = the position attended to). Text padding (``text_mask`` 0/False) is masked as a
key for every row, so no position ever reads a pad token; queries are never padded.
"""

from __future__ import annotations

import torch


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T]``: position i sees positions ``j <= i``."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def prefix_causal_mask(prefix_len: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T]`` semi-causal mask: the first ``prefix_len`` positions see each other (bidirectional),
    every later position i sees the whole prefix and positions ``j <= i``.

    ``length`` is the total sequence length T (prefix included); ``0 <= prefix_len <= length``.
    """
    if not 0 <= prefix_len <= length:
        raise ValueError(f"prefix_causal_mask: prefix_len {prefix_len} outside [0, {length}]")
    mask = causal_mask(length, device)
    mask[:, :prefix_len] = True
    return mask


def _joint_mask(text_mask: torch.Tensor, num_queries: int, query_sees_text: bool,
                text_sees_query: bool, text_causal: bool) -> torch.Tensor:
    """``[B, M+T, M+T]`` from the block structure ``[[QQ, QT], [TQ, TT]]`` and the text key padding.

    QQ is always all-True; QT/TQ are all-True or all-False; TT is all-True or causal.
    """
    batch, length = text_mask.shape
    total, device = num_queries + length, text_mask.device
    structure = torch.ones(total, total, dtype=torch.bool, device=device)
    structure[:num_queries, num_queries:] = query_sees_text
    structure[num_queries:, :num_queries] = text_sees_query
    if text_causal:
        structure[num_queries:, num_queries:] = causal_mask(length, device)
    queries_valid = torch.ones(batch, num_queries, dtype=torch.bool, device=device)
    keys_valid = torch.cat([queries_valid, text_mask.bool()], dim=1)
    return structure[None] & keys_valid[:, None, :]


def unimodal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """BLIP-2 ITC: queries see queries only, text sees text only.

    Args:
        text_mask: ``[B, T]`` text padding mask (1/True = real token).
        num_queries: M.

    Returns:
        ``[B, M+T, M+T]`` bool.
    """
    return _joint_mask(text_mask, num_queries, query_sees_text=False, text_sees_query=False, text_causal=False)


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """BLIP-2 ITM: every position sees every (non-pad) position. ``text_mask [B, T]`` → ``[B, M+T, M+T]``."""
    return _joint_mask(text_mask, num_queries, query_sees_text=True, text_sees_query=True, text_causal=False)


def multimodal_causal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """BLIP-2 ITG: queries see queries only; text token t sees all queries and text ``<= t``.

    ``text_mask [B, T]`` → ``[B, M+T, M+T]``.
    """
    return _joint_mask(text_mask, num_queries, query_sees_text=False, text_sees_query=True, text_causal=True)


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask for packed rows (several samples per sequence).

    Position i sees position ``j <= i`` only when both belong to the same sample (same segment id);
    attention never crosses packed samples. A padding position (segment 0) sees only itself, so no
    row of the mask is all False (SDPA would give NaN).

    Args:
        segment_ids: ``[B, T]`` 1, 2, … per packed sample, 0 on padding.

    Returns:
        ``[B, T, T]`` bool.
    """
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return (same & real & causal_mask(length, segment_ids.device)) | eye


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """``segment_ids [B, T]`` → ``position_ids [B, T]`` restarting at 0 for each packed sample (0 on padding).

    Segments must be contiguous runs (as :func:`datamodules.pipeline.packing.collate_rows` writes them).
    """
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = segment_ids != torch.nn.functional.pad(segment_ids, (1, 0), value=-1)[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return (index - first).masked_fill(segment_ids == 0, 0)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``attention_mask [B, T]`` → ``position_ids [B, T]`` counting real tokens only (0 under padding).

    With left padding the first real token of every row gets position 0, as without padding.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
