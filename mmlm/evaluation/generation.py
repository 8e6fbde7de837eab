"""Generated text scored per task, each by its benchmark's reference protocol.

:class:`GenerationEvaluator` asks the module for ``generate_text(batch)`` once per batch and hands each example to the
scorer of its task (``batch.tasks``):

========  =====================================================================  ================================
task      scored as                                                              result file (official format)
========  =====================================================================  ================================
vqa       VQAv2 ``vqaEval.py`` (:func:`mmlm.metrics.vqa.vqa_accuracy`), overall   ``[{"question_id", "answer"}]``
          and per answer type / question type                                    + ``.accuracy.json``
gqa       LAVIS's GQA protocol: processed prediction == the answer               ``[{"questionId", "prediction"}]``
caption   COCO caption evaluation (CIDEr-D, BLEU, ROUGE-L; PTB tokenizer)         ``[{"image_id", "caption"}]``
plan      plan exact match and per-step accuracy (PaLM-E)                        ``[{"id", "plan", "reference"}]``
========  =====================================================================  ================================

Ids keep the type they have in the data (COCO and VQAv2 ids are integers), so the official tools accept the files.
Every rank gathers every task's rows in one fixed order; the scores are computed from the gathered rows, so the logged
numbers are exactly those of the written files. Shape legend: B batch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mmlm.distributed import gather_objects
from mmlm.evaluation.base import Evaluator, ResultFiles, StepOutput
from mmlm.metrics.captioning import caption_scores, resolve_caption_tokenizer
from mmlm.metrics.plans import parse_plan, step_accuracy
from mmlm.metrics.vqa import normalize_answer, vqa_accuracy, vqa_accuracy_normalized, vqa_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """What scoring needs of one evaluation example.

    Attributes:
        id: the example's evaluation id as the data has it (``question_id``, ``image_id``; int or str).
        task: its task name (``"vqa"``, ``"caption"``, …).
        references: reference strings (human answers, captions); empty when unknown (predict, test-dev).
        question_type: VQA question type (``""`` where unknown).
        answer_type: VQA answer type (``"yes/no"``, ``"number"``, ``"other"``; ``""`` where unknown).
    """

    id: Any
    task: str
    references: list[str] = field(default_factory=list)
    question_type: str = ""
    answer_type: str = ""


def samples_of(batch: Any) -> list[Sample]:
    """One :class:`Sample` per evaluation example of a ``Batch`` or ``SentenceBatch`` (``[]`` without tasks)."""
    tasks = list(batch.tasks or [])

    def column(name: str, default: Any) -> list[Any]:
        values = list(getattr(batch, name, None) or [])
        return values if len(values) == len(tasks) else [default] * len(tasks)

    ids, references = column("ids", None), column("references", [])
    qtypes, atypes = column("question_types", ""), column("answer_types", "")
    return [Sample(i, t, list(r), q, a) for i, t, r, q, a in zip(ids, tasks, references, qtypes, atypes)]


def first_per_key(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The first row of each value of ``row[key]``, in order (a sample evaluated twice counts once)."""
    first: dict[Any, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row[key], row)
    return list(first.values())


def metric_key(text: str) -> str:
    """``text`` as a logger key part: runs of characters other than letters, digits and ``_`` become ``_``."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_") or "_"


class TaskScorer:
    """Scores one task's generated text (a plain object; rows are JSON-serialisable dicts).

    Attributes:
        task: the task name it scores.
        main_metric: its headline metric (progress bar).
    """

    task: str = ""
    main_metric: str = ""

    def row(self, sample: Sample, text: str) -> dict[str, Any]:
        """The kept row of one example: the prediction in the task's result format plus what scoring needs."""
        raise NotImplementedError

    def score(self, rows: list[dict[str, Any]], files: ResultFiles) -> dict[str, float]:
        """Metrics over all ranks' rows (``{}`` when none has references); writes the task's files."""
        raise NotImplementedError


class VQAScorer(TaskScorer):
    """VQAv2 accuracy by the official ``vqaEval.py`` (see :mod:`mmlm.metrics.vqa`).

    Logs ``vqa_acc`` and, per answer type and question type, ``vqa_acc_{type}`` and ``vqa_acc_qtype/{type}``
    (fractions). Writes ``{stage}-vqa-step{N}.json`` (the official result format, one row per question id) and
    ``….accuracy.json`` (the official ``accuracy`` dict: overall, perQuestionType, perAnswerType, in percent rounded
    to two digits, as ``VQAEval`` reports).

    Args:
        normalized: also report ``vqa_acc_normalized`` (:func:`~mmlm.metrics.vqa.vqa_accuracy_normalized`: the human
            answers normalised like the prediction; a friendlier number for raw answers, never ``vqa_acc``).
    """

    task, main_metric = "vqa", "vqa_acc"

    def __init__(self, normalized: bool = False) -> None:
        self.normalized = normalized
        self._warned = False

    def row(self, sample: Sample, text: str) -> dict[str, Any]:
        return {"question_id": sample.id, "answer": text, "answers": sample.references,
                "question_type": sample.question_type, "answer_type": sample.answer_type}

    def score(self, rows: list[dict[str, Any]], files: ResultFiles) -> dict[str, float]:
        rows = first_per_key(rows, "question_id")
        files.write_json(self.task, [{"question_id": r["question_id"], "answer": r["answer"]} for r in rows])
        files.write_settings(self.task, len(rows), scorer="VQAv2 vqaEval.py (2016, as LAVIS)")
        scored = [r for r in rows if r["answers"]]
        if not scored:
            return {}
        self._warn_single_answers(scored)
        scores = [vqa_accuracy(r["answer"], r["answers"]) for r in scored]
        summary = vqa_summary(scores, [r["question_type"] for r in scored], [r["answer_type"] for r in scored])
        files.write_json(self.task, summary, ".accuracy.json")
        metrics = {"vqa_acc": sum(scores) / len(scores)}
        metrics |= self._per_type(scored, scores, "answer_type", "vqa_acc_{}")
        metrics |= self._per_type(scored, scores, "question_type", "vqa_acc_qtype/{}")
        if self.normalized:
            normalized = [vqa_accuracy_normalized(r["answer"], r["answers"]) for r in scored]
            metrics["vqa_acc_normalized"] = sum(normalized) / len(normalized)
        return metrics

    @staticmethod
    def _per_type(rows: list[dict[str, Any]], scores: list[float], key: str, name: str) -> dict[str, float]:
        """Mean score per non-empty value of ``row[key]``, keyed ``name.format(type)``."""
        groups: dict[str, list[float]] = {}
        for row, score in zip(rows, scores):
            if row[key]:
                groups.setdefault(row[key], []).append(score)
        return {name.format(metric_key(kind)): sum(v) / len(v) for kind, v in groups.items()}

    def _warn_single_answers(self, rows: list[dict[str, Any]]) -> None:
        """Warn once when questions have a single answer: the official scorer gives them 0."""
        single = sum(len(r["answers"]) < 2 for r in rows)
        if single and not self._warned:
            self._warned = True
            log.warning("%d of %d VQA questions have one human answer: VQAv2's scorer gives them 0 (leave-one-out "
                        "over the answers). Use source kind 'gqa' for single-answer data sets.", single, len(rows))


class GQAScorer(TaskScorer):
    """GQA accuracy as LAVIS evaluates it: the prediction through the VQA answer processing
    (:func:`~mmlm.metrics.vqa.normalize_answer`) must equal the single ground-truth answer. Logs ``gqa_acc``;
    writes ``{stage}-gqa-step{N}.json`` in GQA's submission format (``questionId``, ``prediction``)."""

    task, main_metric = "gqa", "gqa_acc"

    def row(self, sample: Sample, text: str) -> dict[str, Any]:
        return {"questionId": sample.id, "prediction": text, "answers": sample.references}

    def score(self, rows: list[dict[str, Any]], files: ResultFiles) -> dict[str, float]:
        files.write_json(self.task, [{"questionId": r["questionId"], "prediction": r["prediction"]} for r in rows])
        files.write_settings(self.task, len(rows), scorer="LAVIS GQA: normalize_answer(prediction) == answer")
        scored = [r for r in rows if r["answers"]]
        if not scored:
            return {}
        hits = [float(normalize_answer(r["prediction"]) == r["answers"][0]) for r in scored]
        return {"gqa_acc": sum(hits) / len(hits)}


class CaptionScorer(TaskScorer):
    """COCO caption evaluation: one caption per image id (the first), scored against that image's references
    with pycocoevalcap's scorers after its PTB tokenizer (Java), or the Java-free mimic where Java is absent
    (:func:`mmlm.metrics.captioning.caption_scores`). Logs ``cider``, ``bleu4`` and whatever else the scorer
    reports; writes ``{stage}-caption-step{N}.json`` (COCO results format) and ``….scores.json``.

    Args:
        tokenizer: ``"auto"`` (PTB when Java is installed), ``"ptb"`` or ``"python"``.
    """

    task, main_metric = "caption", "cider"

    def __init__(self, tokenizer: str = "auto") -> None:
        self.tokenizer = tokenizer

    def row(self, sample: Sample, text: str) -> dict[str, Any]:
        return {"image_id": sample.id, "caption": text, "references": sample.references}

    def score(self, rows: list[dict[str, Any]], files: ResultFiles) -> dict[str, float]:
        per_image = first_per_key(rows, "image_id")
        files.write_json(self.task, [{"image_id": r["image_id"], "caption": r["caption"]} for r in per_image])
        tokenizer = resolve_caption_tokenizer(self.tokenizer)
        files.write_settings(self.task, len(per_image), tokenizer=tokenizer)
        scored = [r for r in per_image if r["references"]]
        if not scored:
            return {}
        scores = caption_scores([r["caption"] for r in scored], [r["references"] for r in scored], tokenizer)
        files.write_json(self.task, {**scores, "tokenizer": tokenizer, "images": len(scored)}, ".scores.json")
        return scores


class PlanScorer(TaskScorer):
    """Plans (PaLM-E): exact match of the whole normalised plan (``plan_exact``) and per-step accuracy
    (``plan_step_acc``, :func:`mmlm.metrics.plans.step_accuracy`); writes ``{stage}-plan-step{N}.json``."""

    task, main_metric = "plan", "plan_exact"

    def row(self, sample: Sample, text: str) -> dict[str, Any]:
        return {"id": sample.id, "plan": text, "reference": sample.references[0] if sample.references else ""}

    def score(self, rows: list[dict[str, Any]], files: ResultFiles) -> dict[str, float]:
        files.write_json(self.task, rows)
        files.write_settings(self.task, len(rows))
        scored = [(parse_plan(r["plan"]), parse_plan(r["reference"])) for r in rows if r["reference"]]
        if not scored:
            return {}
        return {"plan_exact": sum(p == r for p, r in scored) / len(scored),
                "plan_step_acc": sum(step_accuracy(p, r) for p, r in scored) / len(scored)}


def text_scorers() -> list[TaskScorer]:
    """The scorers of every image → text family: VQA, GQA and captions."""
    return [VQAScorer(), GQAScorer(), CaptionScorer()]


class GenerationEvaluator(Evaluator):
    """Generate once per batch (``module.generate_text(batch)``), keep one row per example under its task's scorer,
    score every task at the end of the epoch.

    Args:
        scorers: one :class:`TaskScorer` per task (default :func:`text_scorers`); an example whose task has no
            scorer stops the evaluation with an error naming it.
    """

    def __init__(self, scorers: Sequence[TaskScorer] | None = None) -> None:
        super().__init__()
        self.scorers = {s.task: s for s in (text_scorers() if scorers is None else scorers)}
        self.main_metric = next(iter(self.scorers.values())).main_metric if self.scorers else None
        self._rows: dict[str, list[dict[str, Any]]] = {task: [] for task in self.scorers}

    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        """Generated text of ``batch``; rows ``{"id", "task", "prediction"}`` (what ``predict_step`` returns)."""
        samples = samples_of(batch)
        texts = module.generate_text(batch) if samples else []
        if len(texts) != len(samples):
            raise ValueError(f"{type(module).__name__}.generate_text gave {len(texts)} texts for {len(samples)} "
                             "evaluation examples")
        for sample, text in zip(samples, texts):
            self._rows[self._scorer(sample.task).task].append(self._scorer(sample.task).row(sample, text))
        return StepOutput(rows=[{"id": s.id, "task": s.task, "prediction": t} for s, t in zip(samples, texts)])

    def _scorer(self, task: str) -> TaskScorer:
        if task not in self.scorers:
            raise ValueError(f"evaluation example of task {task!r}: this module scores {sorted(self.scorers)} "
                             "(check the data source's kind)")
        return self.scorers[task]

    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        """Gather every task's rows (one collective per task, same order on every rank) and score them."""
        metrics: dict[str, Tensor | float] = {}
        for task, scorer in self.scorers.items():
            rows = gather_objects(self._rows[task])
            self._rows[task] = []
            if rows:
                metrics |= scorer.score(rows, files)
        return metrics
