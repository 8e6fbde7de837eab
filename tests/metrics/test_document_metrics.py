"""Donut metrics: Zhang–Shasha TED on hand-made trees, TED accuracy and field F1 equal to a re-derivation
of Donut's ``JSONParseEvaluator`` (``tests/reference/donut_eval.py``, zss + nltk), NED, ANLS / exact match,
and the metric classes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
from reference import donut_eval

from mmlm.json_tokens import donut_prediction, donut_token2json, json_to_tokens
from mmlm.metrics.documents import (
    AnswerMetrics,
    DocumentMetrics,
    TreeNode,
    anls,
    answer_text,
    edit_distance,
    exact_match,
    field_counts,
    field_f1,
    json_distance,
    json_tree,
    most_common_json,
    most_common_json_baseline,
    normalize_json,
    normalized_edit_distance,
    reference_answers,
    score_answer,
    score_document,
    score_sequence,
    ted_accuracy,
    tree_edit_distance,
)


def tree(label: str, *children: TreeNode) -> TreeNode:
    return TreeNode(label, children=list(children))


def unit(a: TreeNode, b: TreeNode) -> int:
    return int(a.label != b.label)


def one(_: TreeNode) -> int:
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
    pq, qp = tree("r", tree("p"), tree("q")), tree("r", tree("q"), tree("p"))
    assert tree_edit_distance(pq, qp, one, one, unit) == 2
    assert tree_edit_distance(a, a, one, one, unit) == 0
    # Empty root vs a 5-node tree under it: five insertions.
    assert tree_edit_distance(tree("f"), a, one, one, unit) == 5


def test_donut_costs_by_hand():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}]}
    assert normalize_json(gt) == {"menu": [{"nm": ["cake"], "cnt": ["2"]}]}
    # ∅ → gt inserts menu, <subtree>, nm, "cake" (4), cnt, "2" (1): 1 + 1 + 1 + 4 + 1 + 1 = 9
    assert json_distance({}, gt) == 9
    assert json_distance({"menu": [{"nm": "cakes", "cnt": "2"}]}, gt) == 1        # one character
    assert json_distance({"menu": [{"nm": "cake"}]}, gt) == 2                # cnt node + its 1-char leaf
    assert json_distance({"menu": [{"nn": "cake", "cnt": "2"}]}, gt) == 1          # key relabel
    assert json_distance({"menu": [{"name": "cake", "cnt": "2"}]}, gt) == 5  # (len, key) order moves it
    assert ted_accuracy({"menu": [{"nm": "cakes", "cnt": "2"}]}, gt) == pytest.approx(1 - 1 / 9)
    assert ted_accuracy(gt, gt) == 1.0
    assert ted_accuracy({}, gt) == 0.0
    assert ted_accuracy({"text_sequence": "x" * 100}, gt) == 0.0                   # clipped at 0
    # An empty ground truth: Donut divides by TED(∅, ∅) = 0 and max(0, nan or -inf) is 0, whatever the
    # prediction.
    assert ted_accuracy({}, {}) == 0.0 and ted_accuracy({"a": "b"}, {}) == 0.0
    assert ted_accuracy({"a": ""}, {"b": [" ", None]}) == 0.0                       # normalises to {}


def test_tree_shape_follows_donut():
    t = json_tree(normalize_json({"menu": [{"nm": "a"}, {"nm": "b"}], "total": "3"}))
    assert [c.label for c in t.children] == ["menu", "total"]                      # keys by (len, key)
    assert [c.label for c in t.children[0].children] == ["<subtree>", "<subtree>"]
    assert t.children[1].children[0].leaf and t.children[1].children[0].label == "3"


def test_field_f1():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}, {"nm": "tea", "cnt": "1"}], "total": "9"}
    assert field_f1([gt], [gt]) == 1.0
    pred = {"menu": [{"nm": "cake", "cnt": "2"}], "total": "8"}  # tp 2, fp 1 (total 8), fn 3 (tea, 1, 9)
    assert field_f1([pred], [gt]) == pytest.approx(2 / (2 + 4 / 2))
    assert field_f1([{}], [gt]) == 0.0
    assert field_f1([{"a": ["x", "x"]}], [{"a": ["x"]}]) == pytest.approx(1 / (1 + 1 / 2))  # multiset
    assert field_f1([{}, gt], [{}, gt]) == 1.0


def test_document_metrics_class_and_baseline():
    gt = {"menu": [{"nm": "cake", "cnt": "2"}], "total": "9"}
    metric = DocumentMetrics()
    cakes = donut_prediction("<s_cord-v2>" + json_to_tokens({"menu": [{"nm": "cakes", "cnt": "2"}]}) + "</s>",
                             eos_token="</s>")
    metric.update([gt, cakes], [[json.dumps(gt)], [json.dumps({"menu": [{"nm": "cake", "cnt": "2"}]})]])
    metric.update(["garbage </s_x>"], [[json.dumps({"a": "b"}), json.dumps(gt)]])  # a string: a sequence
    out = metric.compute()
    assert out["count"] == 3
    assert out["ted_accuracy"].item() == pytest.approx((1 + (1 - 1 / 9) + 0) / 3)
    assert out["f1"].item() == pytest.approx(4 / (4 + (2 + 2) / 2))  # tp 3 + 1; fp 1, fn 1 + 2 (best ref a:b)
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


# ------------------------------------------------------------------ equal to Donut's JSONParseEvaluator

KEYS = ["a", "b", "nm", "cnt", "menu", "price", "sub_total", "<subtree>"]
WORDS = ["cake", "2", "tea", "9.50", "", " ", "Cake", "ca ke", "1", " 7 "]


def random_leaf(rng: random.Random) -> Any:
    """A scalar as Donut's ground truths and parses hold them (mostly strings, some numbers, odd values)."""
    return rng.choice(WORDS + [3, 2.5, 0, None, True, ""])


def random_value(rng: random.Random, depth: int) -> Any:
    """A leaf, a list of leaves, a list of dicts or a dict."""
    roll = rng.random()
    if depth >= 3 or roll < 0.45:
        return random_leaf(rng)
    if roll < 0.6:
        return [random_leaf(rng) for _ in range(rng.randint(0, 3))]
    if roll < 0.8:
        return [random_dict(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return random_dict(rng, depth + 1)


def random_dict(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {key: random_value(rng, depth) for key in rng.sample(KEYS, rng.randint(0, 4))}


def mutate(value: Any, rng: random.Random) -> Any:
    """A near copy: keys dropped or added, list items dropped or repeated, characters edited."""
    if isinstance(value, dict):
        out = {k: mutate(v, rng) for k, v in value.items() if rng.random() > 0.15}
        if rng.random() < 0.2:
            out[rng.choice(KEYS)] = random_value(rng, 2)
        return out
    if isinstance(value, list):
        out = [mutate(item, rng) for item in value if rng.random() > 0.15]
        return out + out[-1:] if out and rng.random() < 0.15 else out
    if isinstance(value, str) and value and rng.random() < 0.4:
        cut = rng.randrange(len(value))
        return value[:cut] + rng.choice(["", "x", "AB"]) + value[cut + 1:]
    return value


def test_ted_accuracy_and_f1_equal_donut_on_random_pairs():
    rng = random.Random(0)
    preds, gts = [], []
    for _ in range(300):
        gt = random_dict(rng)
        pred = mutate(gt, rng) if rng.random() < 0.7 else random_dict(rng)
        if rng.random() < 0.1:  # a top-level list, as token2json returns for records separated by <sep/>
            pred = [pred, mutate(pred, rng)]
        assert ted_accuracy(pred, gt) == donut_eval.cal_acc(pred, gt), (pred, gt)
        if field_counts(pred, gt) != (0, 0):
            assert field_f1([pred], [gt]) == donut_eval.cal_f1([pred], [gt]), (pred, gt)
        preds.append(pred)
        gts.append(gt)
    assert field_f1(preds, gts) == donut_eval.cal_f1(preds, gts)
    assert 0 < sum(0 < ted_accuracy(p, g) < 1 for p, g in zip(preds, gts))  # not only the easy 0s and 1s


@pytest.mark.parametrize("pred, gt", [
    ({"menu": [{"nm": "cake", "cnt": "2"}]},
     {"menu": [{"nm": "cake", "cnt": "2"}, {"nm": "tea", "cnt": "1"}]}),
    ({"menu": {"nm": "cake"}}, {"menu": [{"nm": "cake"}]}),                    # a one-item list is its item
    ({"name": "cake"}, {"nm": "cake"}),
    ({"a": ["x", "y"]}, {"a": ["y", "x"]}),                                     # order matters
    ({"a": [["x"], "y", {"b": "1"}]}, {"a": ["y"]}),                            # inner lists, dicts dropped
    ({"a": 3, "b": 2.5, "c": True}, {"a": "3", "b": "2.5", "c": "True"}),      # numbers compare as strings
    ({"<leaf>k": "v"}, {"k": "v"}),                                             # Donut's "<leaf>" label test
    ({"k": "a<leaf>b"}, {"k": "ab"}),
    ({"<subtree>": [{"a": "1"}]}, {"x": [{"a": "1"}]}),
    ({"text_sequence": "hello wrld"}, {"text_sequence": "hello world"}),
    ([{"a": "1"}, {"a": "2"}], {"a": "1"}),                                     # a top-level list of records
    ({"a": " 1 ", "b": " "}, {"a": "1", "b": ""}),                              # stripped; " " keeps its key
    ({}, {"a": {"b": {"c": "deep"}}}),
])
def test_hand_cases_equal_donut(pred, gt):
    assert ted_accuracy(pred, gt) == donut_eval.cal_acc(pred, gt)
    assert field_f1([pred], [gt]) == donut_eval.cal_f1([pred], [gt])


def test_empty_ground_truth_scores_zero_like_donut():
    for pred in ({}, {"a": "b"}, {"text_sequence": ""}, [{"a": "1"}]):
        for gt in ({}, {"a": ""}, {"a": [None, " "]}, {"a": {"b": []}}):
            assert ted_accuracy(pred, gt) == 0.0 == donut_eval.cal_acc(pred, gt), (pred, gt)
    # No field anywhere: Donut divides by zero; mmlm's F1 is 1 (documented).
    with pytest.raises(ZeroDivisionError):
        donut_eval.cal_f1([{}], [{"a": ""}])
    assert field_f1([{}], [{"a": ""}]) == 1.0


# --------------------------------------------------------------------------- per sample, from parsed JSON


def test_score_document_takes_parsed_json_and_the_best_reference():
    refs = [json.dumps({"answer": "x"}), {"menu": [{"nm": "cake", "cnt": "2"}]}]   # JSON strings or values
    scores = score_document({"menu": {"nm": "cakes", "cnt": "2"}}, refs)
    assert scores.ted_accuracy == pytest.approx(1 - 1 / 9) and (scores.tp, scores.fn_or_fp) == (1, 2)
    canonical = "<s_menu><s_nm>cakes</s_nm><s_cnt>2</s_cnt></s_menu>"                # json_to_tokens(pred)
    assert scores.ned == normalized_edit_distance(canonical, json_to_tokens(refs[1])) == pytest.approx(1 / 51)
    with pytest.raises(ValueError, match="no reference"):
        score_document({}, [])
    # score_sequence parses like Donut: a repeated key keeps its last value, a categorical token of the added
    # vocabulary becomes its category.
    assert score_sequence("<s_a>1</s_a><s_a>2</s_a>", [json.dumps({"a": "2"})]).ted_accuracy == 1.0
    assert score_sequence("<s_class><memo/></s_class>", [{"class": "memo"}], added_vocab={"<memo/>"}).tp == 1
    assert score_sequence("<s_class><memo/></s_class>", [{"class": "memo"}]).tp == 0


# --------------------------------------------------------------------------- DocVQA answers


@pytest.mark.parametrize("prediction, answers, expected", [
    ("hello", ["hello"], 1.0),
    ("HeLLo", ["hello"], 1.0),                      # lower-cased
    ("  hello   world ", ["hello world"], 1.0),     # stripped, whitespace runs collapsed
    ("a  b", ["a c"], 1 - 1 / 4),                   # normalised distance / the longer *raw* length
    ("abxy", ["abcd"], 0.5),                        # NL = 0.5 exactly: the official script keeps 1 − NL ≥ 0.5
    ("axyz", ["abcd"], 0.0),                        # NL = 0.75
    ("abxyz", ["abcde"], 0.0),                      # NL = 0.6: similarity 0.4 < 0.5
    ("1045", ["x", "10.45"], 1 - 1 / 5),            # best over the answers
    ("10.45", ["10.46", "10.45"], 1.0),
    ("", ["12.50"], 0.0),
    ("", [""], 1.0),                                # both empty: NL 0
])
def test_anls_hand_cases(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


def test_anls_threshold_and_exact_match():
    assert anls("abxd", ["abcd"]) == 0.75 and anls("abxd", ["abcd"], threshold=0.8) == 0.0
    assert anls("abcd", ["abcd"], threshold=1.0) == 1.0
    with pytest.raises(ValueError, match="no ground-truth answer"):
        anls("x", [])
    # Donut's test.py: the answer string is one of the answers, exactly (no case or space normalisation).
    assert exact_match("12.50", ["12.5", "12.50"]) == 1.0
    assert exact_match("12.50 ", ["12.50"]) == 0.0 and exact_match("Total", ["total"]) == 0.0
    assert score_answer("Total", ["total"]) == {"anls": 1.0, "exact_match": 0.0}


def test_wrong_or_missing_docvqa_answer_scores_zero():
    """The issue: scoring the whole {question, answer} JSON by TED gave a wrong answer 0.84 and an empty one
    0.76, because the question (copied from the prompt) is always right. The answer alone scores 0."""
    question = "what is the total?"
    gt = {"question": question, "answer": "10.45"}
    answers = reference_answers([json.dumps(gt), json.dumps({"question": question, "answer": "10.45 USD"})])
    assert answers == ["10.45", "10.45 USD"]
    prompt = f"<s_docvqa><s_question>{question}</s_question><s_answer>"
    for generated in ("3.20</s_answer></s>", "</s_answer></s>", "</s><pad><pad>"):
        parsed = donut_prediction(prompt + generated, eos_token="</s>", pad_token="<pad>")
        assert parsed.get("question") == question
        assert score_answer(answer_text(parsed), answers) == {"anls": 0.0, "exact_match": 0.0}, generated
    assert ted_accuracy({"question": question, "answer": "3.20"}, gt) == pytest.approx(0.84)
    assert ted_accuracy({"question": question, "answer": ""}, gt) == pytest.approx(0.76)
    right = donut_prediction(prompt + "10.45</s_answer></s>", eos_token="</s>")
    assert score_answer(answer_text(right), answers) == {"anls": 1.0, "exact_match": 1.0}


def test_answer_text():
    assert answer_text({"question": "q", "answer": "a"}) == "a"
    assert answer_text({"question": "q"}) == "" and answer_text([{"answer": "a"}]) == ""
    assert answer_text({"answer": ["a", "b"]}) == "a<sep/>b"                  # generated "a<sep/>b"
    assert answer_text(donut_token2json("<s_answer>a<sep/>b</s_answer>")) == "a<sep/>b"


def test_answer_metrics_class_and_ddp_merge():
    preds = ["10.45", {"question": "q", "answer": "10.46"}, "", "TOTAL"]
    answers = [["10.45"], ["10.45"], ["12.50"], ["total", "sum"]]
    whole, first, second = AnswerMetrics(), AnswerMetrics(), AnswerMetrics()
    whole.update(preds, answers)
    out = whole.compute()
    assert out["count"] == 4
    assert out["anls"].item() == pytest.approx((1 + 0.8 + 0 + 1) / 4)
    assert out["exact_match"].item() == pytest.approx(1 / 4)
    first.update(preds[:1], answers[:1])
    second.update(preds[1:], answers[1:])
    first.merge_state(second)
    for name, value in out.items():
        assert first.compute()[name].item() == pytest.approx(value.item()), name
    with pytest.raises(ValueError, match="answer lists"):
        whole.update(["x"], [])
