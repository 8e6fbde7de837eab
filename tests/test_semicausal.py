"""Semi-causal LM building blocks: span sampling, packing/docking, labels and the attention views."""

from __future__ import annotations

import pytest
import torch

from mmlm.losses import IGNORE_INDEX
from mmlm.semicausal import (
    dock,
    encoder_mask,
    pack_spans,
    runs_to_span_ids,
    sample_prefix_spans,
    sample_spans,
    semicausal_mask,
    span_labels,
    span_start,
)


def spans_of(row: torch.Tensor) -> list[list[int]]:
    """Positions of each span id of one row, in order."""
    return [row.eq(k).nonzero().flatten().tolist() for k in range(1, int(row.max()) + 1)]


def test_runs_are_numbered_per_row_in_reading_order():
    selected = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert runs_to_span_ids(selected).tolist() == [[0, 1, 1, 0, 2, 0], [1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("seed", range(20))
def test_random_spans_respect_region_lengths_count_and_gaps(seed):
    region = torch.zeros(3, 40, dtype=torch.bool)
    region[0, 1:39] = True
    region[1, 5:20] = True
    region[2, 1:4] = True
    generator = torch.Generator().manual_seed(seed)
    span_ids = sample_spans(region, ratio=0.4, min_len=2, max_len=5, max_spans=3, generator=generator)
    assert not bool((span_ids > 0)[~region].any()), "a span left its region"
    for row in range(3):
        spans = spans_of(span_ids[row])
        assert len(spans) <= 3
        assert sum(map(len, spans)) == min(round(0.4 * int(region[row].sum())), 3 * 5)  # the budget, capped
        for positions in spans:
            assert positions == list(range(positions[0], positions[-1] + 1))
            assert 2 <= len(positions) <= 5 or row == 2
        for left, right in zip(spans, spans[1:]):
            assert right[0] - left[-1] >= 2, "spans touch: no causal token between them"
    assert len(spans_of(span_ids[0])) >= 1  # 38 positions at 40 % always fit a span
    assert (span_ids[2] > 0).sum() == 1  # budget round(0.4 * 3) = 1 < min_len: one shorter span


@pytest.mark.parametrize("length", [8, 40, 100, 254, 300, 1000, 2046])
def test_rows_of_any_length_get_spans_at_the_ratio(length):
    """The paper's settings (25 %, 64-128 tokens, up to 8 spans): a row under 256 tokens is encoded at 25 %
    too (one span shorter than 64), a long row in spans of 64-128."""
    region = torch.zeros(50, length + 2, dtype=torch.bool)
    region[:, 1:length + 1] = True
    span_ids = sample_spans(region, 0.25, 64, 128, 8, torch.Generator().manual_seed(length))
    covered = (span_ids > 0).sum(1)
    assert bool((covered == round(0.25 * length)).all())
    for row in span_ids:
        lengths = [len(p) for p in spans_of(row)]
        assert len(lengths) <= 8 and (all(64 <= n <= 128 for n in lengths) or lengths == [round(0.25 * length)])


def test_random_spans_are_reproducible_and_vary_with_the_seed():
    region = torch.ones(4, 30, dtype=torch.bool)
    draw = [sample_spans(region, 0.3, 1, 4, 3, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_a_region_with_a_hole_is_refused():
    region = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="row 0.*contiguous"):
        sample_spans(region)


def test_prefix_spans_start_at_the_region_and_leave_a_target():
    region = torch.zeros(64, 12, dtype=torch.bool)
    region[:, 3:9] = True
    span_ids = sample_prefix_spans(region, torch.Generator().manual_seed(0))
    lengths = (span_ids > 0).sum(1)
    assert int(lengths.min()) == 0 and int(lengths.max()) == 5  # [0, n - 1] with n = 6, all drawn in 64 rows
    for row in span_ids:
        positions = (row > 0).nonzero().flatten().tolist()
        assert positions == list(range(3, 3 + len(positions)))


def test_pack_then_dock_puts_every_span_vector_back_at_its_positions():
    ids = torch.tensor([[1, 10, 11, 12, 4, 13, 2], [1, 20, 21, 3, 2, 0, 0]])
    span_ids = torch.tensor([[0, 1, 1, 0, 0, 2, 0], [0, 0, 1, 1, 0, 0, 0]])
    tokens, mask = pack_spans(ids, span_ids, pad_id=0)
    assert tokens.tolist() == [[10, 11], [13, 0], [21, 3]] and mask.tolist() == [[1, 1], [1, 0], [1, 1]]
    encoded = -tokens.float()[..., None].expand(-1, -1, 2)  # a recognisable "encoding" per token
    docked = dock(ids.float()[..., None].expand(-1, -1, 2), span_ids, encoded, mask)
    expected = torch.where(span_ids > 0, -ids, ids).float()
    assert torch.equal(docked[..., 0], expected) and torch.equal(docked[..., 1], expected)


def test_dock_refuses_a_count_mismatch():
    span_ids = torch.tensor([[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="placeholder"):
        dock(torch.zeros(1, 4, 3), span_ids, torch.zeros(1, 3, 3), torch.ones(1, 3))


def test_no_loss_on_encoded_spans():
    labels = torch.tensor([[1, 10, 11, 12, 2, IGNORE_INDEX]])
    span_ids = torch.tensor([[0, 1, 1, 0, 0, 0]])
    assert span_labels(labels, span_ids).tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX, 12, 2, IGNORE_INDEX]]


def test_encoder_sees_its_whole_span_and_the_decoder_is_causal_over_the_docked_sequence():
    span_ids = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    assert span_start(span_ids).tolist() == [[0, 1, 1, 1, 4, 5, 5, 7]]
    enc = encoder_mask(span_ids)[0]
    assert bool(enc[1, 3]) and bool(enc[3, 1]) and not bool(enc[1, 5]) and not bool(enc[0].any())
    seen = semicausal_mask(span_ids, attention)[0].int().tolist()
    assert seen == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # the docked span carries its future tokens 2 and 3 ...
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],  # ... but a causal position never sees a later token
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],  # padding (column 7) is never seen
    ]
