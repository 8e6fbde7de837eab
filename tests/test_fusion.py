"""``mmlm.fusion``: splice placeholders with modality embeddings, prepend prefix placeholders."""

from __future__ import annotations

import pytest
import torch

from mmlm.fusion import prepend_placeholders, splice

P = 99  # placeholder id


def test_splice_fills_placeholders_in_reading_order_with_exact_values():
    ids = torch.tensor([[5, P, P, 6, 7],
                        [P, P, 8, 9, 4]])
    text = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    items = -torch.arange(1, 2 * 2 * 3 + 1, dtype=torch.float32).view(2, 2, 3)  # [K=2, M=2, D=3]
    out = splice(text, ids, P, items)
    expected = text.clone()
    expected[0, 1], expected[0, 2] = items[0, 0], items[0, 1]  # item 0 fills the first run
    expected[1, 0], expected[1, 1] = items[1, 0], items[1, 1]  # item 1 the second
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(text, torch.arange(30, dtype=torch.float32).view(2, 5, 3)), "splice modified its input"


def test_splice_accepts_flat_embeddings_and_several_items_per_row():
    ids = torch.tensor([[P, 3, P, P, P]])  # one row holding 4 slots (two items of M=2)
    text = torch.zeros(1, 5, 2)
    flat = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    out = splice(text, ids, P, flat)
    torch.testing.assert_close(out[0, [0, 2, 3, 4]], flat, rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], torch.zeros(2), rtol=0, atol=0)


def test_splice_count_mismatch_names_both_counts():
    ids = torch.tensor([[P, P, 1], [P, 2, 3]])
    with pytest.raises(ValueError, match=r"3 placeholder.*4 embeddings"):
        splice(torch.zeros(2, 3, 4), ids, P, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"3 placeholder.*2 embeddings"):
        splice(torch.zeros(2, 3, 4), ids, P, torch.zeros(1, 2, 4))


def test_splice_gradients_reach_text_and_modality_embeddings():
    ids = torch.tensor([[1, P, 2], [P, 3, 4]])
    text = torch.randn(2, 3, 4, requires_grad=True)
    items = torch.randn(2, 1, 4, requires_grad=True)
    weight = torch.randn(2, 3, 4)
    (splice(text, ids, P, items) * weight).sum().backward()
    slots = (ids == P).unsqueeze(-1)
    torch.testing.assert_close(text.grad, weight.masked_fill(slots, 0.0))
    torch.testing.assert_close(items.grad, weight[ids == P].view(2, 1, 4))


def test_prepend_keeps_left_padding_on_the_left():
    ids = torch.tensor([[0, 0, 5, 6],
                        [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1],
                         [1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, 6],
                           [7, 8, 9, 10]])
    new_ids, new_mask, new_labels = prepend_placeholders(ids, mask, P, 2, labels)
    assert torch.equal(new_ids, torch.tensor([[0, 0, P, P, 5, 6],
                                              [P, P, 7, 8, 9, 10]]))
    assert torch.equal(new_mask, torch.tensor([[0, 0, 1, 1, 1, 1],
                                               [1, 1, 1, 1, 1, 1]]))
    assert torch.equal(new_labels, torch.tensor([[-100, -100, -100, -100, 5, 6],
                                                 [-100, -100, 7, 8, 9, 10]]))
    assert new_mask.dtype == mask.dtype


def test_prepend_keeps_right_padded_rows_in_order():
    ids = torch.tensor([[5, 6, 0, 0],
                        [7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 0, 0],
                         [1, 1, 1, 1]])
    labels = torch.tensor([[-100, 6, -100, -100],
                           [-100, 8, 9, 10]])
    new_ids, new_mask, new_labels = prepend_placeholders(ids, mask, P, 3, labels)
    assert torch.equal(new_ids, torch.tensor([[P, P, P, 5, 6, 0, 0],
                                              [P, P, P, 7, 8, 9, 10]]))
    assert torch.equal(new_mask, torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                                               [1, 1, 1, 1, 1, 1, 1]]))
    assert torch.equal(new_labels, torch.tensor([[-100, -100, -100, -100, 6, -100, -100],
                                                 [-100, -100, -100, -100, 8, 9, 10]]))


def test_prepend_without_labels_returns_none_and_splice_fills_the_prefix():
    ids = torch.tensor([[0, 4], [3, 4]])
    mask = torch.tensor([[0, 1], [1, 1]])
    new_ids, new_mask, new_labels = prepend_placeholders(ids, mask, P, 1)
    assert new_labels is None
    assert torch.equal(new_ids, torch.tensor([[0, P, 4], [P, 3, 4]]))
    prefix = torch.tensor([[[1.0]], [[2.0]]])  # [B, k=1, D=1]
    out = splice(torch.zeros(2, 3, 1), new_ids, P, prefix)
    assert out[0, 1, 0] == 1.0 and out[1, 0, 0] == 2.0


def test_prepend_placeholders_to_an_empty_prompt():
    """An empty prompt with a tokenizer without bos gives ``[B, 0]`` ids: the result is the slots alone."""
    ids = torch.zeros(2, 0, dtype=torch.long)
    out_ids, out_mask, _ = prepend_placeholders(ids, torch.zeros(2, 0, dtype=torch.long), placeholder_id=9, count=3)
    assert out_ids.tolist() == [[9, 9, 9]] * 2 and out_mask.tolist() == [[1, 1, 1]] * 2


def test_move_to_front_keeps_order_fills_and_honours_min_width():
    from mmlm.fusion import move_to_front, targets_only

    values = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    keep = torch.tensor([[False, True, False, True], [False, False, False, False]])
    moved, kept = move_to_front(values, keep, fill=0)
    assert moved.tolist() == [[6, 8], [0, 0]] and kept.tolist() == [[True, True], [False, False]]
    moved, kept = move_to_front(values, torch.zeros_like(keep), fill=9, min_width=1)
    assert moved.tolist() == [[9], [9]] and not kept.any()
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 7, -100, -100]])
    assert targets_only(labels).tolist() == [[3, 4], [7, -100]]
