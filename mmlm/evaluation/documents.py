"""Document understanding (Donut) scored as Donut's own evaluation scores it.

Per batch the module's ``generate_sequences(batch)`` gives each document's decoded sequence, prompt included
(``<s_cord-v2>…`` / ``<s_docvqa><s_question>…</s_question><s_answer>…</s_answer>``), the text Donut's inference
parses. Validation and test parse it as Donut does (:func:`mmlm.json_tokens.donut_prediction`: first tag dropped,
then ``token2json`` semantics; categorical leaves need the tokenizer's added vocabulary), ``predict`` with the
lenient :func:`mmlm.json_tokens.tokens_to_json`. Scores by task (``batch.tasks``, the datamodule's task names):

* ``docvqa``: the predicted ``answer`` only, against every ground-truth answer: ANLS (threshold 0.5, the DocVQA
  definition) and exact match (Donut's ``test.py``) → ``anls``, ``exact_match``;
* ``rvlcdip``: the predicted ``class`` equals the ground truth's (Donut's ``test.py``) → ``class_accuracy``, and TED;
* every other task (extraction, reading): TED accuracy (Donut's ``JSONParseEvaluator.cal_acc``, best over the
  ground-truth parses), field F1 (``cal_f1``, micro over the set) and normalised edit distance → ``ted_accuracy``,
  ``f1``, ``ned``.

Per-field confidence (``confidence=True`` and a module with ``token_probabilities``, as
:class:`mmlm.models.documents.DocumentModule`): each decoded sequence is teacher-forced once with its image and the
probability of each generated token grouped into the values of the JSON tags (:func:`value_spans`), paired in order
with the leaves of the parsed prediction (:func:`field_confidences`): ``{"menu[0].nm": {"mean": …, "min": …}}``, in
the predict rows and in ``documents.jsonl`` (``mmlm report`` shows it; ``--load-model`` computes it with the same
functions for runs written without it).

Files (rank 0): ``{stage}-documents-step{N}.jsonl`` (one row per document: ``id``, ``key``, ``task``, ``text``,
``prediction``, ``confidence`` when computed and, when known, ``references``), one JSON per document in ``{stage}-documents-step{N}/{id}.json``,
the decoding settings in ``….generation.json`` and the scores in ``….scores.json``. Shape legend: B batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from mmlm.distributed import gather_objects
from mmlm.evaluation.base import Evaluator, ResultFiles, StepOutput
from mmlm.json_tokens import donut_prediction, tokens_to_json
from mmlm.metrics.documents import (
    answer_text,
    f1_from_counts,
    reference_answers,
    score_answer,
    score_document,
)

#: Tasks scored on their answer (ANLS, exact match) rather than their whole JSON.
ANSWER_TASKS = ("docvqa",)
#: Tasks scored on their class (Donut's RVL-CDIP accuracy) as well as TED.
CLASS_TASKS = ("rvlcdip",)
#: The JSON tags that open and close a value (``<s_key>``, ``</s_key>``, ``<sep/>``).
TAG = re.compile(r"</?s_[^>]+>|<sep/>")


def leaf_paths(data: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of JSON ``data`` by its path (``menu[0].nm``); an empty dict or list is a leaf."""
    if isinstance(data, dict) and data:
        return {p: v for k, item in data.items() for p, v in leaf_paths(item, f"{path}.{k}" if path else k).items()}
    if isinstance(data, list) and data:
        return {p: v for i, item in enumerate(data) for p, v in leaf_paths(item, f"{path}[{i}]").items()}
    return {path: data}


def prompt_length(tokens: Sequence[str]) -> int:
    """Tokens of the task prompt: through ``<s_answer>`` when present (DocVQA), else the first token."""
    return tokens.index("<s_answer>") + 1 if "<s_answer>" in tokens else 1


def value_positions(tokens: Sequence[str], counted: Sequence[bool]) -> list[list[int]]:
    """The token positions of each value: runs of non-tag tokens closed by a tag (``<s_x>``, ``</s_x>``, ``<sep/>``);
    a category token (``<x/>``) is a value of its own. Positions not ``counted`` (the prompt) start no value."""
    spans: list[list[int]] = []
    current: list[int] = []
    for position, (token, count) in enumerate(zip(tokens, counted)):
        if TAG.fullmatch(token) or re.fullmatch(r"<[^>]+/>", token):
            if current:
                spans.append(current)
            current = []
            if not TAG.fullmatch(token) and count:
                spans.append([position])
        elif count:
            current.append(position)
    return spans + ([current] if current else [])


def value_spans(tokens: Sequence[str], probabilities: Sequence[float | None]) -> list[list[float]]:
    """The probabilities of each value (:func:`value_positions`); prompt tokens (probability ``None``) start none."""
    positions = value_positions(tokens, [p is not None for p in probabilities])
    return [[probabilities[i] for i in span] for span in positions]  # type: ignore[misc]


def field_positions(tokens: Sequence[str], start: int, prediction: Any) -> dict[str, list[int]]:
    """``leaf path → token positions`` of the prediction's leaves, paired in order with the values after the prompt's
    ``start`` tokens (the last leaves when the prompt holds the first ones); ``{}`` when they do not pair up."""
    spans = value_positions(tokens, [i >= start for i in range(len(tokens))])
    paths = list(leaf_paths(prediction))
    if not spans or len(spans) > len(paths):
        return {}
    return dict(zip(paths[len(paths) - len(spans):], spans))


def field_confidences(tokens: Sequence[str], probabilities: Sequence[float | None],
                      prediction: Any) -> dict[str, dict[str, float]]:
    """``leaf path → {"mean", "min"}`` of the prediction's leaves (:func:`field_positions`: paired in order with the
    values, the last leaves when the prompt holds the first ones, as DocVQA's question); ``{}`` when they do not pair
    up. ``probabilities`` is ``None`` on the prompt."""
    start = next((i for i, p in enumerate(probabilities) if p is not None), len(probabilities))
    fields = field_positions(tokens, start, prediction)
    values = {path: [float(probabilities[i]) for i in span] for path, span in fields.items()}  # type: ignore[arg-type]
    return {path: {"mean": sum(span) / len(span), "min": min(span)} for path, span in values.items()}


def file_name(doc_id: Any) -> str:
    """A safe file name for a document id (path separators and odd characters become ``_``)."""
    return re.sub(r"[^\w.\-]+", "_", str(doc_id)).strip(".") or "_"


def document_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """TED accuracy, field F1 and NED over the JSON-scored rows (``{}`` when there is none)."""
    scored = [score_document(r["prediction"], r["references"]) for r in rows]
    if not scored:
        return {}
    count = len(scored)
    return {"ted_accuracy": sum(s.ted_accuracy for s in scored) / count,
            "f1": f1_from_counts(sum(s.tp for s in scored), sum(s.fn_or_fp for s in scored)),
            "ned": sum(s.ned for s in scored) / count}


def answer_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean ANLS and exact match of the rows' predicted answers (``{}`` when there is none)."""
    scored = [score_answer(answer_text(r["prediction"]), reference_answers(r["references"])) for r in rows]
    if not scored:
        return {}
    return {name: sum(s[name] for s in scored) / len(scored) for name in ("anls", "exact_match")}


def class_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Share of rows whose predicted ``class`` is the ground truth's (``{}`` when there is none)."""
    if not rows:
        return {}
    hits = [answer_text(r["prediction"], "class") in reference_answers(r["references"], "class") for r in rows]
    return {"class_accuracy": sum(hits) / len(hits)}


def scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Every score of the labelled rows, each task by its protocol (see the module docstring)."""
    labelled = [r for r in rows if r.get("references")]
    answers = [r for r in labelled if r["task"] in ANSWER_TASKS]
    documents = [r for r in labelled if r["task"] not in ANSWER_TASKS]
    classes = [r for r in labelled if r["task"] in CLASS_TASKS]
    return {**document_scores(documents), **answer_scores(answers), **class_scores(classes)}


class DocumentEvaluator(Evaluator):
    """Generate, parse and score documents as Donut (see the module docstring).

    The module provides ``generate_sequences(batch) -> list[str]`` (prompt + generation, tags kept, no eos/pad) and a
    ``tokenizer`` (its added vocabulary decides which ``<x/>`` leaves are categories); for confidence also
    ``token_probabilities(pixels, texts, features) -> [(tokens, probabilities)]``.

    Args:
        confidence: add each predicted field's mean and minimum token probability (``confidence`` of the rows; one
            teacher-forced pass per batch).
    """

    main_metric = "ted_accuracy"

    def __init__(self, confidence: bool = True) -> None:
        super().__init__()
        self.confidence = confidence
        self._rows: list[dict[str, Any]] = []

    def confidences(self, module: Any, batch: Any, sequences: list[str],
                    predictions: list[Any]) -> list[dict[str, dict[str, float]] | None]:
        """:func:`field_confidences` of each sequence (``None`` each when off or the module cannot say)."""
        if not self.confidence or not hasattr(module, "token_probabilities"):
            return [None] * len(sequences)
        scored = module.token_probabilities(batch.pixels, sequences, batch.features)
        return [field_confidences(tokens, probabilities, prediction)
                for (tokens, probabilities), prediction in zip(scored, predictions)]

    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        sequences = module.generate_sequences(batch)
        vocab = set(module.tokenizer.get_added_vocab())
        parsed = [tokens_to_json(s) if stage == "predict" else donut_prediction(s, vocab) for s in sequences]
        rows = []
        for i, (sequence, confidence) in enumerate(zip(sequences, self.confidences(module, batch, sequences, parsed))):
            row = {"id": batch.ids[i] if batch.ids else batch.keys[i], "key": batch.keys[i] if batch.keys else "",
                   "task": batch.tasks[i] if batch.tasks else "", "text": sequence, "prediction": parsed[i]}
            if confidence is not None:
                row["confidence"] = confidence
            if batch.references and batch.references[i]:
                row["references"] = [json.loads(r) for r in batch.references[i]]
            rows.append(row)
        self._rows += rows
        shown = ("id", "task", "prediction", "confidence")
        return StepOutput(rows=[{k: r[k] for k in shown if k in r} for r in rows])

    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        rows, self._rows = gather_objects(self._rows), []
        if not rows:
            return {}
        files.write_jsonl("documents", rows)
        folder = files.path("documents", "")
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows:
                (folder / f"{file_name(row['id'])}.json").write_text(
                    json.dumps(row["prediction"], ensure_ascii=False, indent=1), encoding="utf-8")
        files.write_settings("documents", len(rows), parser="tokens_to_json" if stage == "predict" else "token2json")
        if stage == "predict":
            return {}
        metrics = scores(rows)
        if metrics:
            files.write_json("documents", metrics, ".scores.json")
        self.main_metric = "ted_accuracy" if "ted_accuracy" in metrics else "anls"
        return metrics
