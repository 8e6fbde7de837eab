"""Donut metrics: Zhang–Shasha TED on hand-made trees, TED accuracy, field F1, NED, the metric class."""

from __future__ import annotations

import json

import pytest
import torch

from mmlm.json_tokens import json_to_tokens
from mmlm.metrics.documents import (
    DocumentMetrics,
    Node,
    edit_distance,
    field_f1,
    json_distance,
    json_tree,
    most_common_json,
    most_common_json_baseline,
    normalize_json,
    normalized_edit_distance,
    ted_accuracy,
    tree_edit_distance,
)


def tree(label: str, *children: Node) -> Node:
    return Node(label, children=list(children))


def unit(a: Node, b: Node) -> int:
    return int(a.label != b.label)


def one(_: Node) -> int:
    return 1


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert normalized_edit_distance("abcd", "abce") == 0.25
    assert normalized_edit_distance("", "") == 0.0 and normalized_edit_distance("", "ab") == 1.0


def test_zhang_shasha_unit_costs_on_hand_made_trees():
    # The example of Zhang & Shasha (1989): f(d(a, c(b)), e) → f(c(d(a, b)), e) takes 2 edits.
    a = tree("f", tree("d", tree("a"), tree("c", tree("b"))), tree("e"))
    b = tree("f", tree("c", tree("d", tree("a"), tree("b"))), tree("e"))
    assert tree_edit_distance(a, b, one, one, unit) == 2
    assert tree_edit_distance(b, a, one, one, unit) == 2
    # Removing an inner node lifts its children: r(x(p, q)) → r(p, q) is one edit.
    assert tree_edit_distance(tree("r", tree("x", tree("p"), tree("q"))), tree("r", tree("p"), tree("q")),
                              one, one, unit) == 1
    # Order matters: r(p, q) → r(q, p) is two relabels (or remove + insert).
    assert tree_edit_distance(tree("r", tree("p"), tree("q")), tree("r", tree("q"), tree("p")), one, one, unit) == 2
    assert tree_edit_distance(a, a, one, one, unit) == 0
    # Empty root vs a 5-node tree under it: five insertions.
    assert tree_edit_distance(tree("f"), a, one, one, unit) == 5


def test_donut_costs_by_hand():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}]}
    assert normalize_json(gt) == {"menu": [{"nm": ["cake"], "cnt": ["2"]}]}
    # ∅ → gt inserts menu, <subtree>, nm, "cake" (4), cnt, "2" (1): 1 + 1 + 1 + 4 + 1 + 1 = 9
    assert json_distance({}, gt) == 9
    assert json_distance({"menu": [{"nm": "cakes", "cnt": "2"}]}, gt) == 1        # one character
    assert json_distance({"menu": [{"nm": "cake"}]}, gt) == 2                      # cnt node + its 1-char leaf
    assert json_distance({"menu": [{"nn": "cake", "cnt": "2"}]}, gt) == 1          # key relabel
    assert json_distance({"menu": [{"name": "cake", "cnt": "2"}]}, gt) == 5        # (len, key) order moves it: 5
    assert ted_accuracy({"menu": [{"nm": "cakes", "cnt": "2"}]}, gt) == pytest.approx(1 - 1 / 9)
    assert ted_accuracy(gt, gt) == 1.0
    assert ted_accuracy({}, gt) == 0.0
    assert ted_accuracy({"text_sequence": "x" * 100}, gt) == 0.0                   # clipped at 0
    assert ted_accuracy({}, {}) == 1.0 and ted_accuracy({"a": "b"}, {}) == 0.0


def test_tree_shape_follows_donut():
    t = json_tree(normalize_json({"menu": [{"nm": "a"}, {"nm": "b"}], "total": "3"}))
    assert [c.label for c in t.children] == ["menu", "total"]                      # keys by (len, key)
    assert [c.label for c in t.children[0].children] == ["<subtree>", "<subtree>"]
    assert t.children[1].children[0].leaf and t.children[1].children[0].label == "3"


def test_field_f1():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}, {"nm": "tea", "cnt": "1"}], "total": "9"}
    assert field_f1([gt], [gt]) == 1.0
    pred = {"menu": [{"nm": "cake", "cnt": "2"}], "total": "8"}   # tp 2, fp 1 (total 8), fn 3 (tea, 1, total 9)
    assert field_f1([pred], [gt]) == pytest.approx(2 / (2 + 4 / 2))
    assert field_f1([{}], [gt]) == 0.0
    assert field_f1([{"a": ["x", "x"]}], [{"a": ["x"]}]) == pytest.approx(1 / (1 + 1 / 2))  # multiset
    assert field_f1([{}, gt], [{}, gt]) == 1.0


def test_document_metrics_class_and_baseline():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}], "total": "9"}
    metric = DocumentMetrics()
    metric.update([json_to_tokens(gt), "<s_cord-v2>" + json_to_tokens({"menu": [{"nm": "cakes", "cnt": "2"}]})],
                  [[json.dumps(gt)], [json.dumps({"menu": [{"nm": "cake", "cnt": "2"}]})]])
    metric.update(["garbage </s_x>"], [[json.dumps({"a": "b"}), json.dumps(gt)]])
    out = metric.compute()
    assert out["count"] == 3
    assert out["ted_accuracy"].item() == pytest.approx((1 + (1 - 1 / 9) + 0) / 3)
    assert out["f1"].item() == pytest.approx(4 / (4 + (2 + 2) / 2))   # tp 3 + 1; fp 1, fn 1 + 2 (best ref a:b)
    assert 0 < out["ned"].item() < 1
    reading = DocumentMetrics()
    reading.update(["hello world"], [[json.dumps({"text_sequence": "hello word"})]])
    assert reading.compute()["ned"].item() == pytest.approx(1 / 11)
    train = [{"class": "memo"}, {"class": "invoice"}, {"class": "memo"}]
    assert most_common_json(train) == {"class": "memo"}
    base = most_common_json_baseline(train, [[{"class": "memo"}], [{"class": "letter"}]])
    assert base["json"] == {"class": "memo"} and base["f1"] == 0.5
    assert base["ted_accuracy"] == pytest.approx((1 + (1 - 5 / 7)) / 2)  # memo→letter 5 edits, ∅→letter 1 + 6
    assert isinstance(out["ted_accuracy"], torch.Tensor)


def test_states_add_up_across_ranks():
    """Two 'ranks' merged with the DDP reduction (sums) give the single-process result."""
    gts = [{"total": "9"}, {"menu": [{"nm": "tea"}]}, {"text_sequence": "abc"}, {"a": "b"}]
    preds = [json_to_tokens({"total": "8"}), json_to_tokens(gts[1]), "abd", ""]
    refs = [[json.dumps(g)] for g in gts]
    whole, first, second = DocumentMetrics(), DocumentMetrics(), DocumentMetrics()
    whole.update(preds, refs)
    first.update(preds[:1], refs[:1])
    second.update(preds[1:], refs[1:])
    first.merge_state(second)
    for name, value in whole.compute().items():
        assert first.compute()[name].item() == pytest.approx(value.item()), name
