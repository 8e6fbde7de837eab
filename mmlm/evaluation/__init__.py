"""Evaluation composed into every family: evaluators for generated text, retrieval, classification and documents,
each scoring by its benchmark's reference protocol (see ``docs/evaluation.md``)."""

from mmlm.evaluation.base import Evaluation, Evaluator, LossEvaluator, ResultFiles, StepOutput, result_file
from mmlm.evaluation.classification import ClassificationEvaluator
from mmlm.evaluation.documents import DocumentEvaluator
from mmlm.evaluation.generation import (
    CaptionScorer,
    GenerationEvaluator,
    GQAScorer,
    PlanScorer,
    Sample,
    TaskScorer,
    VQAScorer,
    text_scorers,
)
from mmlm.evaluation.knn import KnnEvaluator, knn_classify, linear_probe
from mmlm.evaluation.retrieval import RerankStore, RetrievalEvaluator, RetrievalStep

__all__ = [
    "CaptionScorer",
    "ClassificationEvaluator",
    "DocumentEvaluator",
    "Evaluation",
    "Evaluator",
    "GenerationEvaluator",
    "GQAScorer",
    "KnnEvaluator",
    "knn_classify",
    "linear_probe",
    "LossEvaluator",
    "PlanScorer",
    "RerankStore",
    "result_file",
    "ResultFiles",
    "RetrievalEvaluator",
    "RetrievalStep",
    "Sample",
    "StepOutput",
    "TaskScorer",
    "text_scorers",
    "VQAScorer",
]
