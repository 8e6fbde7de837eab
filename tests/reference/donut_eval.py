"""An independent re-derivation of Donut's ``JSONParseEvaluator`` (clovaai/donut ``donut/util.py``).

It follows Donut's definitions step by step and uses the same libraries Donut uses — ``zss.distance``
(Zhang–Shasha) for the tree edit distance and ``nltk.edit_distance`` for leaf relabelling — so that mmlm's
own Zhang–Shasha and normalisation (:mod:`mmlm.metrics.documents`) can be checked against it:

- ``normalize_dict``: ``{}`` for any falsy value; a dict gets its keys in ``(len(key), key)`` order, each
  non-empty normalised value wrapped in a list; a list of dicts keeps its non-empty normalised items, any
  other list keeps the stripped, non-empty ``str``/``int``/``float`` items; a scalar becomes
  ``[str(value).strip()]``.
- trees: ``<root>``, key nodes named by the key, ``<subtree>`` per dict in a list, and leaves named
  ``"<leaf>" + text``; a node is a leaf exactly when ``"<leaf>"`` occurs in its label.
- costs: insert/remove a leaf = length of its label without ``<leaf>``, else 1; update leaf → leaf = edit
  distance of the texts, leaf ↔ non-leaf = 1 + the leaf's text length, non-leaf → non-leaf = label inequality.
- ``cal_acc = max(0, 1 − d(pred, gt) / d(∅, gt))`` with numpy floats from ``zss`` (0/0 is nan, d/0 is inf,
  and ``max(0, nan)`` and ``max(0, -inf)`` are 0); ``cal_f1`` is micro F1 with a removal-based multiset
  match and no zero-division guard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zss
from nltk import edit_distance

LEAF = "<leaf>"


def normalize_dict(data: Any) -> Any:
    """Donut's normalisation of a JSON value (see the module docstring)."""
    if not data:
        return {}
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key in sorted(data.keys(), key=lambda k: (len(k), k)):
            value = normalize_dict(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            kept = (normalize_dict(item) for item in data)
            return [item for item in kept if item]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def flatten(data: Any) -> list[tuple[str, Any]]:
    """``(dotted.key, leaf)`` pairs of normalised JSON, depth first."""
    pairs: list[tuple[str, Any]] = []

    def walk(value: Any, key: str) -> None:
        if type(value) is dict:
            for child_key, child in value.items():
                walk(child, f"{key}.{child_key}" if key else child_key)
        elif type(value) is list:
            for item in value:
                walk(item, key)
        else:
            pairs.append((key, value))

    walk(data, "")
    return pairs


def to_tree(data: Any, name: str = "<root>") -> zss.Node:
    """A ``zss`` tree of normalised JSON (Donut's ``construct_tree_from_dict``)."""
    node = zss.Node(name)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(to_tree(value, key))
    elif isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            for item in data:
                node.addkid(to_tree(item, "<subtree>"))
        else:
            for item in data:
                node.addkid(zss.Node(f"{LEAF}{item}"))
    else:
        raise TypeError(f"cannot build a tree from {data!r} under {name!r}")
    return node


def insert_remove_cost(node: zss.Node) -> int:
    """Leaf: its text length; any other node: 1."""
    return len(node.label.replace(LEAF, "")) if LEAF in node.label else 1


def update_cost(a: zss.Node, b: zss.Node) -> int:
    """Relabelling cost (see the module docstring)."""
    a_leaf, b_leaf = LEAF in a.label, LEAF in b.label
    if a_leaf and b_leaf:
        return edit_distance(a.label.replace(LEAF, ""), b.label.replace(LEAF, ""))
    if a_leaf != b_leaf:
        return 1 + len((a.label if a_leaf else b.label).replace(LEAF, ""))
    return int(a.label != b.label)


def tree_distance(a: zss.Node, b: zss.Node) -> float:
    """``zss.distance`` with Donut's costs (a numpy float)."""
    return zss.distance(a, b, get_children=zss.Node.get_children, insert_cost=insert_remove_cost,
                        remove_cost=insert_remove_cost, update_cost=update_cost)


def cal_acc(pred: Any, answer: Any) -> float:
    """Donut's nTED accuracy ``max(0, 1 − d(pred, gt) / d(∅, gt))``, numpy division semantics included."""
    gt_tree = to_tree(normalize_dict(answer))
    distance = tree_distance(to_tree(normalize_dict(pred)), gt_tree)
    scale = tree_distance(to_tree(normalize_dict({})), gt_tree)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(max(0, 1 - np.float64(distance) / np.float64(scale)))


def cal_f1(preds: list[Any], answers: list[Any]) -> float:
    """Donut's micro field F1 (raises ``ZeroDivisionError`` when there is no field at all)."""
    tp, fn_or_fp = 0, 0
    for pred, answer in zip(preds, answers):
        predicted, expected = flatten(normalize_dict(pred)), flatten(normalize_dict(answer))
        for pair in predicted:
            if pair in expected:
                tp += 1
                expected.remove(pair)
            else:
                fn_or_fp += 1
        fn_or_fp += len(expected)
    return tp / (tp + fn_or_fp / 2)
