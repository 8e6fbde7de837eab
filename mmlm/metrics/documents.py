"""Document understanding metrics (Donut): tree-edit-distance accuracy, field F1, normalised edit distance.

Definitions follow Donut's ``JSONParseEvaluator`` (clovaai/donut ``donut/util.py``):

- **Normalisation** (:func:`normalize_json`): dict keys sorted by ``(len(key), key)``, every value
  turned into a list, empty values dropped; a list of dicts stays a list of normalised dicts,
  any other list keeps its non-empty scalar items as stripped strings.
- **Tree** (:func:`json_tree`): a ``<root>`` node; a dict key is a node whose children are its
  value's nodes; a dict inside a list is a ``<subtree>`` node; a scalar is a leaf.
- **Tree edit distance** (:func:`tree_edit_distance`, Zhang–Shasha): inserting or removing a leaf
  costs its text length, any other node 1; relabelling leaf → leaf costs the character edit
  distance, leaf ↔ inner node ``1 + len(leaf text)``, inner → inner ``0`` or ``1``.
- **TED accuracy** (:func:`ted_accuracy`): ``max(0, 1 − TED(pred, gt) / TED(∅, gt))`` with ∅ the
  root-only tree. Donut divides by zero on an empty ground truth; here it is 1 when the
  prediction is empty too, else 0.
- **Field F1** (:func:`field_f1`): micro F1 over flattened ``(dotted.key, value)`` pairs of the
  normalised JSON (``tp / (tp + (fp + fn) / 2)``), multiset matching. With no field on either
  side it is 1.
- **NED** (:func:`normalized_edit_distance`): character edit distance / the longer length.

Shape legend: B batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torchmetrics import Metric

from mmlm.json_tokens import json_to_tokens, tokens_to_json

ROOT, SUBTREE = "<root>", "<subtree>"


# --------------------------------------------------------------------------- strings


@lru_cache(maxsize=65536)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (unit insert, delete and substitute costs)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalized_edit_distance(prediction: str, reference: str) -> float:
    """``edit_distance / max(len)`` in ``[0, 1]``; 0 when both strings are empty."""
    longest = max(len(prediction), len(reference))
    return edit_distance(prediction, reference) / longest if longest else 0.0


# --------------------------------------------------------------------------- trees


@dataclass
class Node:
    """A labelled ordered tree node; ``leaf`` nodes carry text in ``label``."""

    label: str
    leaf: bool = False
    children: list[Node] = field(default_factory=list)


def normalize_json(data: Any) -> Any:
    """Donut's normalisation (see the module docstring): a dict of lists, a list, or ``{}``."""
    if not data:
        return {}
    if isinstance(data, dict):
        normalized = {}
        for key in sorted(data, key=lambda k: (len(str(k)), str(k))):
            value = normalize_json(data[key])
            if value:
                normalized[key] = value if isinstance(value, list) else [value]
        return normalized
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [n for n in (normalize_json(item) for item in data) if n]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def json_tree(data: Any, label: str = ROOT) -> Node:
    """The tree of already normalised JSON (see :func:`normalize_json`)."""
    node = Node(label)
    if isinstance(data, dict):
        node.children = [json_tree(value, str(key)) for key, value in data.items()]
    elif isinstance(data, list):
        node.children = [json_tree(item, SUBTREE) if isinstance(item, dict) else Node(str(item), leaf=True)
                         for item in data]
    return node


def insert_cost(node: Node) -> int:
    """Cost of inserting (or removing) ``node``: its text length for a leaf, else 1."""
    return len(node.label) if node.leaf else 1


def update_cost(a: Node, b: Node) -> int:
    """Cost of relabelling ``a`` as ``b`` (see the module docstring)."""
    if a.leaf and b.leaf:
        return edit_distance(a.label, b.label)
    if a.leaf or b.leaf:
        return 1 + len(a.label if a.leaf else b.label)
    return int(a.label != b.label)


def _postorder(root: Node) -> tuple[list[Node], list[int]]:
    """Nodes in post-order and, per node, the post-order index of its leftmost leaf descendant."""
    nodes: list[Node] = []
    leftmost: list[int] = []

    def visit(node: Node) -> int:
        first = None
        for child in node.children:
            child_leftmost = visit(child)
            first = child_leftmost if first is None else first
        nodes.append(node)
        leftmost.append(len(nodes) - 1 if first is None else first)
        return leftmost[-1]

    visit(root)
    return nodes, leftmost


def _keyroots(leftmost: list[int]) -> list[int]:
    """Key roots: for each leftmost-leaf value, the highest (last in post-order) node having it."""
    last = {leaf: i for i, leaf in enumerate(leftmost)}
    return sorted(last.values())


def tree_edit_distance(a: Node, b: Node, insert: Callable[[Node], int] = insert_cost,
                       remove: Callable[[Node], int] = insert_cost,
                       update: Callable[[Node, Node], int] = update_cost) -> int:
    """Zhang–Shasha ordered tree edit distance between ``a`` and ``b`` under the given costs."""
    nodes_a, left_a = _postorder(a)
    nodes_b, left_b = _postorder(b)
    tree = [[0] * len(nodes_b) for _ in nodes_a]
    for i in _keyroots(left_a):
        for j in _keyroots(left_b):
            _forest_distance(i, j, (nodes_a, left_a), (nodes_b, left_b), tree, (insert, remove, update))
    return tree[-1][-1]


def _forest_distance(i: int, j: int, side_a: tuple[list[Node], list[int]], side_b: tuple[list[Node], list[int]],
                     tree: list[list[int]], costs: tuple[Callable, Callable, Callable]) -> None:
    """Fill ``tree`` for the subtrees of key roots ``i`` (in ``a``) and ``j`` (in ``b``)."""
    (nodes_a, left_a), (nodes_b, left_b) = side_a, side_b
    insert, remove, update = costs
    off_a, off_b = left_a[i] - 1, left_b[j] - 1
    rows, cols = i - off_a + 1, j - off_b + 1
    forest = [[0] * cols for _ in range(rows)]
    for x in range(1, rows):
        forest[x][0] = forest[x - 1][0] + remove(nodes_a[x + off_a])
    for y in range(1, cols):
        forest[0][y] = forest[0][y - 1] + insert(nodes_b[y + off_b])
    for x in range(1, rows):
        na = x + off_a
        for y in range(1, cols):
            nb = y + off_b
            edge = min(forest[x - 1][y] + remove(nodes_a[na]), forest[x][y - 1] + insert(nodes_b[nb]))
            if left_a[na] == left_a[i] and left_b[nb] == left_b[j]:
                forest[x][y] = min(edge, forest[x - 1][y - 1] + update(nodes_a[na], nodes_b[nb]))
                tree[na][nb] = forest[x][y]
            else:
                forest[x][y] = min(edge, forest[left_a[na] - 1 - off_a][left_b[nb] - 1 - off_b] + tree[na][nb])


# --------------------------------------------------------------------------- JSON scores


def json_distance(prediction: Any, reference: Any) -> int:
    """Tree edit distance between the normalised trees of two JSON values."""
    return tree_edit_distance(json_tree(normalize_json(prediction)), json_tree(normalize_json(reference)))


def ted_accuracy(prediction: Any, reference: Any) -> float:
    """``max(0, 1 − TED(pred, ref) / TED(∅, ref))`` (1 for identical JSON, 0 for an empty prediction)."""
    scale = json_distance({}, reference)
    distance = json_distance(prediction, reference)
    if scale == 0:
        return 1.0 if distance == 0 else 0.0
    return max(0.0, 1.0 - distance / scale)


def flatten_json(data: Any, key: str = "") -> list[tuple[str, str]]:
    """``(dotted.key, value)`` pairs of normalised JSON, in order (list items repeat their key)."""
    if isinstance(data, dict):
        return [pair for k, v in data.items() for pair in flatten_json(v, f"{key}.{k}" if key else str(k))]
    if isinstance(data, list):
        return [pair for item in data for pair in flatten_json(item, key)]
    return [(key, data)]


def field_counts(prediction: Any, reference: Any) -> tuple[int, int]:
    """``(true positives, false positives + false negatives)`` of flattened fields (multisets)."""
    predicted = Counter(flatten_json(normalize_json(prediction)))
    expected = Counter(flatten_json(normalize_json(reference)))
    tp = sum((predicted & expected).values())
    return tp, sum(predicted.values()) + sum(expected.values()) - 2 * tp


def f1_from_counts(tp: float, fn_or_fp: float) -> float:
    """``tp / (tp + fn_or_fp / 2)``, 1 when there is no field at all."""
    denominator = tp + fn_or_fp / 2
    return tp / denominator if denominator else 1.0


def field_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Micro field-level F1 over a corpus of predicted and reference JSON values."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    counts = [field_counts(p, r) for p, r in zip(predictions, references)]
    return f1_from_counts(sum(c[0] for c in counts), sum(c[1] for c in counts))


# --------------------------------------------------------------------------- torchmetrics


@dataclass
class SampleScores:
    """Scores of one prediction against its best reference (highest TED accuracy)."""

    ted_accuracy: float
    tp: int
    fn_or_fp: int
    ned: float


def score_sample(prediction: str, references: Sequence[str]) -> SampleScores:
    """Score a generated token sequence against the JSON strings of its ground-truth parses.

    The prediction is parsed with :func:`~mmlm.json_tokens.tokens_to_json` (a leading task token or
    garbage is tolerated). NED compares the canonical sequences ``json_to_tokens`` of the parsed
    prediction and of the reference, so prompt tokens and whitespace do not count.
    """
    if not references:
        raise ValueError(f"prediction {prediction[:80]!r} has no reference")
    parsed = tokens_to_json(prediction)
    refs = [json.loads(r) for r in references]
    accuracies = [ted_accuracy(parsed, r) for r in refs]
    best = refs[max(range(len(refs)), key=accuracies.__getitem__)]
    tp, fn_or_fp = field_counts(parsed, best)
    canonical = json_to_tokens(parsed)
    ned = min(normalized_edit_distance(canonical, json_to_tokens(r)) for r in refs)
    return SampleScores(max(accuracies), tp, fn_or_fp, ned)


class DocumentMetrics(Metric):
    """TED accuracy (mean over samples), micro field F1 and mean NED, summed across DDP ranks.

    ``update(predictions, references)``: ``B`` generated token sequences (eos/pad removed) and ``B``
    lists of ground-truth JSON strings (``Batch.references``). ``compute()`` returns
    ``{"ted_accuracy", "f1", "ned", "count"}`` as float tensors.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("ted_sum", "ned_sum", "tp", "fn_or_fp", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
        for prediction, refs in zip(predictions, references):
            scores = score_sample(prediction, refs)
            self.ted_sum += scores.ted_accuracy
            self.ned_sum += scores.ned
            self.tp += scores.tp
            self.fn_or_fp += scores.fn_or_fp
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        f1 = f1_from_counts(float(self.tp), float(self.fn_or_fp))
        return {"ted_accuracy": self.ted_sum / count, "f1": torch.tensor(f1, dtype=torch.float64),
                "ned": self.ned_sum / count, "count": self.count}


# --------------------------------------------------------------------------- baseline


def canonical_json(data: Any) -> str:
    """A key-sorted JSON string (equal JSON values give equal strings)."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


def most_common_json(ground_truths: Iterable[Any]) -> Any:
    """The most frequent ground-truth JSON value (first seen wins ties)."""
    counts = Counter(canonical_json(g) for g in ground_truths)
    if not counts:
        raise ValueError("most_common_json needs at least one ground truth")
    return json.loads(counts.most_common(1)[0][0])


def most_common_json_baseline(train: Iterable[Any], val: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Predict the training set's most common JSON for every validation sample.

    Args:
        train: training ground-truth JSON values.
        val: per validation sample, its ground-truth JSON values (several for ``gt_parses``).

    Returns:
        ``{"json", "ted_accuracy", "f1", "ned", "count"}`` as :class:`DocumentMetrics` computes them.
    """
    guess = most_common_json(train)
    metric = DocumentMetrics()
    metric.update([json_to_tokens(guess)] * len(val), [[canonical_json(g) for g in refs] for refs in val])
    scores = {k: float(v) for k, v in metric.compute().items()}
    return {"json": guess, **scores}
