"""Packing: block-diagonal causal masks, per-sample positions, first-fit rows and their collation."""

from __future__ import annotations

import pytest
import torch

from datamodules.pipeline.packing import SentenceSample, collate_rows, pack_rows
from mmlm.attention_masks import packed_causal_mask, segment_positions
from mmlm.sentences import IGNORE_INDEX, Sentence, Span

SEGMENTS = torch.tensor([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])


def test_packed_mask_blocks_attention_between_samples():
    mask = packed_causal_mask(SEGMENTS)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                si, sj = int(SEGMENTS[b, i]), int(SEGMENTS[b, j])
                expected = (si == sj and sj > 0 and j <= i) or i == j
                assert bool(mask[b, i, j]) == expected, (b, i, j)


def test_segment_positions_restart_per_sample():
    assert segment_positions(SEGMENTS).tolist() == [[0, 1, 0, 1, 2, 0, 0, 0], list(range(8))]


def sample(key: str, length: int, images: int = 0) -> SentenceSample:
    ids = list(range(10, 10 + length))
    spans = [Span("image", i, 1 + 3 * i, 2, 0, 0) for i in range(images)]
    return SentenceSample(Sentence(ids, [True] * length, spans), {"image": torch.full((images, 3, 2, 2), float(key))},
                          key=key)


def test_first_fit_packing_fills_rows_and_never_exceeds_length():
    rows = list(pack_rows([sample(str(i), n) for i, n in enumerate([6, 3, 5, 2, 4, 1])], max_length=8, open_rows=2))
    assert all(sum(len(s) for s in row) <= 8 for row in rows)
    assert sorted(s.key for row in rows for s in row) == [str(i) for i in range(6)]
    assert [[s.key for s in row] for row in rows] == [["0", "3"], ["1", "2"], ["4", "5"]]
    with pytest.raises(ValueError, match="9 tokens > max_length 8"):
        list(pack_rows([sample("9", 9)], max_length=8))


def test_collated_packed_row_has_segments_positions_labels_and_global_items():
    rows = [[sample("1", 4, images=1), sample("2", 5, images=1)], [sample("3", 7, images=2)]]
    batch = collate_rows(rows, pad_id=0)
    assert batch.input_ids.shape == (2, 9) and batch.num_samples == 3 and batch.packed
    assert batch.segment_ids.tolist() == [[1] * 4 + [2] * 5, [1] * 7 + [0] * 2]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert batch.labels[0, 0] == IGNORE_INDEX and batch.labels[0, 4] == IGNORE_INDEX  # sample starts
    assert (batch.labels[1, 7:] == IGNORE_INDEX).all() and batch.labels[0, 5] == 11
    assert [(s.item, s.start) for row in batch.spans for s in row] == [(0, 1), (1, 5), (2, 1), (3, 4)]
    assert batch.images[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 3.0]
    assert batch.padding_fraction() == pytest.approx(2 / 18)
