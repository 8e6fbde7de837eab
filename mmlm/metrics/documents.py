"""Document understanding metrics (Donut): TED accuracy, field F1, NED, and ANLS / exact match for DocVQA.

Scores equal those of Donut's own evaluation (clovaai/donut ``donut/util.py`` ``JSONParseEvaluator`` and
``test.py``) when the prediction is parsed as Donut parses it: :func:`mmlm.json_tokens.donut_prediction`
(decoded prompt + generation → drop eos/pad and the task token → ``token2json``). The scoring functions
below take that *parsed* JSON.

- **Normalisation** (:func:`normalize_json`, Donut's ``normalize_dict``): dict keys sorted by
  ``(len(key), key)``, every value turned into a list, empty values dropped; a list of dicts stays a
  list of normalised dicts, any other list keeps its non-empty ``str``/``int``/``float`` items as
  stripped strings.
- **Tree** (:func:`json_tree`): a ``<root>`` node; a dict key is a node whose children are its value's
  nodes; a dict inside a list is a ``<subtree>`` node; a scalar is a leaf. Donut marks leaves by
  prefixing ``<leaf>`` to the text and tests for ``"<leaf>" in label``, so a key containing ``<leaf>``
  counts as a leaf and ``<leaf>`` is deleted from texts; this is reproduced.
- **Tree edit distance** (:func:`tree_edit_distance`, Zhang–Shasha): inserting or removing a leaf
  costs its text length, any other node 1; relabelling leaf → leaf costs the character edit distance,
  leaf ↔ inner node ``1 + len(leaf text)``, inner → inner ``0`` or ``1``.
- **TED accuracy** (:func:`ted_accuracy`, Donut's ``cal_acc``): ``max(0, 1 − TED(pred, gt) / TED(∅, gt))``
  with ∅ the root-only tree. With an empty ground truth Donut divides by a zero distance and gets
  ``max(0, nan or -inf) = 0``; here it is 0 too, whatever the prediction.
- **Field F1** (:func:`field_f1`, Donut's ``cal_f1``): micro F1 over flattened ``(dotted.key, value)``
  pairs of the normalised JSON, ``tp / (tp + (fp + fn) / 2)``, multiset matching. Donut divides by
  zero when there is no field on either side of the whole corpus; here that F1 is 1.
- **NED** (:func:`normalized_edit_distance`): character edit distance / the longer length, on the
  canonical sequences ``json_to_tokens`` of the parsed prediction and of each reference (min over them).
- **Exact match** (:func:`exact_match`, Donut's DocVQA score in ``test.py``): 1 when the predicted
  answer string is one of the ground-truth answers, exactly (no normalisation).
- **ANLS** (:func:`anls`): as the official DocVQA / InfographicVQA evaluation script of the Robust
  Reading Competition computes it (https://rrc.cvc.uab.es/?ch=17, www.docvqa.org): both strings
  lower-cased, stripped and with whitespace runs collapsed to one space
  (``" ".join(s.strip().lower().split())``);
  ``NL = levenshtein(normalised) / max(len(answer.upper()), len(prediction.upper()))`` with the lengths
  of the *raw* strings (0 when both are empty); the score is ``1 − min NL`` over the answers, set to 0
  when it is below the threshold (0.5), so ``NL = 0.5`` exactly still scores 0.5 (the paper writes
  ``NL < τ``; the script keeps ``1 − NL ≥ τ``). ANLS over a set is the mean.

Shape legend: B batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torchmetrics import Metric

from mmlm.json_tokens import donut_token2json, json_to_tokens

ROOT, SUBTREE, LEAF = "<root>", "<subtree>", "<leaf>"


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
class TreeNode:
    """A labelled ordered tree node; ``leaf`` nodes carry text in ``label``."""

    label: str
    leaf: bool = False
    children: list[TreeNode] = field(default_factory=list)


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


def json_tree(data: Any, label: str = ROOT) -> TreeNode:
    """The tree of already normalised JSON (see :func:`normalize_json`).

    As in Donut, a label containing ``<leaf>`` is a leaf whose text is the label without ``<leaf>``: so is
    every scalar, and so is a key that happens to contain ``<leaf>`` (its children are kept).
    """
    node = TreeNode(label.replace(LEAF, ""), leaf=LEAF in label)
    if isinstance(data, dict):
        node.children = [json_tree(value, str(key)) for key, value in data.items()]
    elif isinstance(data, list):
        node.children = [json_tree(item, SUBTREE) if isinstance(item, dict)
                         else TreeNode(str(item).replace(LEAF, ""), leaf=True) for item in data]
    return node


def insert_cost(node: TreeNode) -> int:
    """Cost of inserting (or removing) ``node``: its text length for a leaf, else 1."""
    return len(node.label) if node.leaf else 1


def update_cost(a: TreeNode, b: TreeNode) -> int:
    """Cost of relabelling ``a`` as ``b`` (see the module docstring)."""
    if a.leaf and b.leaf:
        return edit_distance(a.label, b.label)
    if a.leaf or b.leaf:
        return 1 + len(a.label if a.leaf else b.label)
    return int(a.label != b.label)


def _postorder(root: TreeNode) -> tuple[list[TreeNode], list[int]]:
    """Nodes in post-order and, per node, the post-order index of its leftmost leaf descendant."""
    nodes: list[TreeNode] = []
    leftmost: list[int] = []

    def visit(node: TreeNode) -> int:
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


def tree_edit_distance(a: TreeNode, b: TreeNode, insert: Callable[[TreeNode], int] = insert_cost,
                       remove: Callable[[TreeNode], int] = insert_cost,
                       update: Callable[[TreeNode, TreeNode], int] = update_cost) -> int:
    """Zhang–Shasha ordered tree edit distance between ``a`` and ``b`` under the given costs."""
    nodes_a, left_a = _postorder(a)
    nodes_b, left_b = _postorder(b)
    tree = [[0] * len(nodes_b) for _ in nodes_a]
    for i in _keyroots(left_a):
        for j in _keyroots(left_b):
            _forest_distance(i, j, (nodes_a, left_a), (nodes_b, left_b), tree, (insert, remove, update))
    return tree[-1][-1]


def _forest_distance(i: int, j: int, side_a: tuple[list[TreeNode], list[int]],
                     side_b: tuple[list[TreeNode], list[int]], tree: list[list[int]],
                     costs: tuple[Callable, Callable, Callable]) -> None:
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
                before = forest[left_a[na] - 1 - off_a][left_b[nb] - 1 - off_b]
                forest[x][y] = min(edge, before + tree[na][nb])


# --------------------------------------------------------------------------- JSON scores


def json_distance(prediction: Any, reference: Any) -> int:
    """Tree edit distance between the normalised trees of two JSON values."""
    return tree_edit_distance(json_tree(normalize_json(prediction)), json_tree(normalize_json(reference)))


def ted_accuracy(prediction: Any, reference: Any) -> float:
    """Donut's ``cal_acc``: ``max(0, 1 − TED(pred, ref) / TED(∅, ref))``; 0 when the reference is empty."""
    scale = json_distance({}, reference)
    if scale == 0:  # Donut: max(0, 0/0 = nan or d/0 = inf) = 0
        return 0.0
    return max(0.0, 1.0 - json_distance(prediction, reference) / scale)


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
    """``tp / (tp + fn_or_fp / 2)``; 1 when there is no field at all (where Donut divides by zero)."""
    denominator = tp + fn_or_fp / 2
    return tp / denominator if denominator else 1.0


def field_f1(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Donut's ``cal_f1``: micro field-level F1 over a corpus of predicted and reference JSON values.

    Equal to Donut's except that a corpus without any field (Donut: ``ZeroDivisionError``) scores 1.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    counts = [field_counts(p, r) for p, r in zip(predictions, references)]
    return f1_from_counts(sum(c[0] for c in counts), sum(c[1] for c in counts))


# --------------------------------------------------------------------------- answers (DocVQA)


def anls_normalize(text: str) -> str:
    """The official ANLS normalisation: lower-cased, stripped, whitespace runs collapsed to one space."""
    return " ".join(text.strip().lower().split())


def answer_similarity(prediction: str, answer: str) -> float:
    """``1 − NL`` of the official DocVQA script: the edit distance of the normalised strings over the
    longer *raw* length (``len(s.upper())``); 1 when both raw strings are empty."""
    longest = max(len(answer.upper()), len(prediction.upper()))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(anls_normalize(answer), anls_normalize(prediction)) / longest


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question: the best similarity over ``answers``, 0 when it is below ``threshold``.

    Raises:
        ValueError: ``answers`` is empty.
    """
    if not answers:
        raise ValueError(f"answer {prediction[:80]!r} has no ground-truth answer")
    best = max(answer_similarity(prediction, answer) for answer in answers)
    return best if best >= threshold else 0.0


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """Donut's DocVQA score (``test.py``): 1.0 when ``prediction`` is one of ``answers`` exactly, else 0.0."""
    return float(prediction in set(answers))


def score_answer(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """``{"anls", "exact_match"}`` of one predicted answer string against its ground-truth answers."""
    return {"anls": anls(prediction, answers, threshold), "exact_match": exact_match(prediction, answers)}


def answer_text(prediction: Any, key: str = "answer") -> str:
    """The answer in a parsed prediction (``{"question": …, "answer": …}``): the value under ``key`` of a
    dict ("" when missing or when the prediction is not a dict); a non-string value (a list, when the
    model wrote ``<sep/>``) is turned back into its token text with ``json_to_tokens``."""
    if not isinstance(prediction, dict) or key not in prediction:
        return ""
    value = prediction[key]
    return value if isinstance(value, str) else json_to_tokens(value)


def reference_answers(references: Sequence[Any], key: str = "answer") -> list[str]:
    """The answers of ground-truth parses (JSON strings as in ``Batch.references``, or dicts), in order;
    parses without a string under ``key`` are skipped."""
    parses = [json.loads(r) if isinstance(r, str) else r for r in references]
    return [p[key] for p in parses if isinstance(p, dict) and isinstance(p.get(key), str)]


# --------------------------------------------------------------------------- per sample


@dataclass
class SampleScores:
    """Scores of one prediction against its best reference (highest TED accuracy)."""

    ted_accuracy: float
    tp: int
    fn_or_fp: int
    ned: float


def _load(reference: Any) -> Any:
    """A reference as JSON: a string is parsed with ``json.loads``, anything else is taken as is."""
    return json.loads(reference) if isinstance(reference, str) else reference


def score_document(prediction: Any, references: Sequence[Any]) -> SampleScores:
    """Score an already parsed prediction (:func:`~mmlm.json_tokens.donut_prediction`) against its
    ground-truth parses (JSON strings as in ``Batch.references``, or parsed values).

    TED accuracy is the best over the references; the field counts are against that best reference (the
    first on ties; with one reference exactly Donut's ``cal_acc`` and ``cal_f1`` terms). NED compares the
    canonical sequences ``json_to_tokens`` of the prediction and of each reference (the smallest).

    Raises:
        ValueError: there is no reference.
    """
    if not references:
        raise ValueError(f"prediction {str(prediction)[:80]!r} has no reference")
    refs = [_load(r) for r in references]
    accuracies = [ted_accuracy(prediction, r) for r in refs]
    best = max(range(len(refs)), key=accuracies.__getitem__)
    tp, fn_or_fp = field_counts(prediction, refs[best])
    canonical = json_to_tokens(prediction)
    ned = min(normalized_edit_distance(canonical, json_to_tokens(r)) for r in refs)
    return SampleScores(accuracies[best], tp, fn_or_fp, ned)


def score_sequence(sequence: str, references: Sequence[Any],
                   added_vocab: Collection[str] = ()) -> SampleScores:
    """:func:`score_document` of a token sequence without task token or eos (e.g. ``json_to_tokens(gt)``),
    parsed with :func:`~mmlm.json_tokens.donut_token2json` as Donut parses generated text."""
    return score_document(donut_token2json(sequence, added_vocab), references)


# --------------------------------------------------------------------------- torchmetrics


def _parsed(prediction: Any) -> Any:
    """A parsed prediction as is; a string is a token sequence, parsed with ``donut_token2json``."""
    return donut_token2json(prediction) if isinstance(prediction, str) else prediction


class DocumentMetrics(Metric):
    """TED accuracy (mean over samples), micro field F1 and mean NED, summed across DDP ranks.

    ``update(predictions, references)``: ``B`` parsed predictions (dicts or lists, from
    :func:`~mmlm.json_tokens.donut_prediction`; a string is taken as a token sequence and parsed with
    :func:`~mmlm.json_tokens.donut_token2json` without added vocabulary) and ``B`` lists of ground-truth
    JSON strings (``Batch.references``). ``compute()`` returns ``{"ted_accuracy", "f1", "ned", "count"}``
    as float tensors.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("ted_sum", "ned_sum", "tp", "fn_or_fp", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[Any], references: Sequence[Sequence[Any]]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
        for prediction, refs in zip(predictions, references):
            scores = score_document(_parsed(prediction), refs)
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


class AnswerMetrics(Metric):
    """DocVQA: mean ANLS and mean exact match (Donut's ``test.py`` score), summed across DDP ranks.

    ``update(predictions, answers)``: ``B`` predicted answer strings (or parsed predictions, whose
    :func:`answer_text` is taken) and ``B`` lists of ground-truth answer strings (see
    :func:`reference_answers`). ``compute()`` returns ``{"anls", "exact_match", "count"}`` as float tensors.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("anls_sum", "exact_sum", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[Any], answers: Sequence[Sequence[str]]) -> None:
        if len(predictions) != len(answers):
            raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
        for prediction, truths in zip(predictions, answers):
            text = prediction if isinstance(prediction, str) else answer_text(prediction)
            scores = score_answer(text, truths, self.threshold)
            self.anls_sum += scores["anls"]
            self.exact_sum += scores["exact_match"]
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"anls": self.anls_sum / count, "exact_match": self.exact_sum / count, "count": self.count}


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

    The prediction is scored as a model that always generates its sequence ``json_to_tokens(guess)``
    would be: parsed back with Donut's ``token2json`` (:func:`score_sequence`).

    Args:
        train: training ground-truth JSON values.
        val: per validation sample, its ground-truth JSON values (several for ``gt_parses``).

    Returns:
        ``{"json", "ted_accuracy", "f1", "ned", "count"}`` as :class:`DocumentMetrics` computes them.
    """
    guess = most_common_json(train)
    parsed = donut_token2json(json_to_tokens(guess))
    metric = DocumentMetrics()
    metric.update([parsed] * len(val), [[canonical_json(g) for g in refs] for refs in val])
    scores = {k: float(v) for k, v in metric.compute().items()}
    return {"json": guess, **scores}
