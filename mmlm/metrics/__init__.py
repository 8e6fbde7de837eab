"""Evaluation metrics as torchmetrics ``Metric`` subclasses (DDP-safe)."""

from mmlm.metrics.captioning import CaptionMetrics, caption_scores, ptb_tokenize
from mmlm.metrics.documents import (
    DocumentMetrics,
    field_f1,
    most_common_json,
    most_common_json_baseline,
    normalized_edit_distance,
    ted_accuracy,
    tree_edit_distance,
)
from mmlm.metrics.plans import PlanAccuracy, parse_plan, step_accuracy
from mmlm.metrics.retrieval import RetrievalRecall, rerank, retrieval_recall
from mmlm.metrics.vqa import VQAAccuracy, majority_answer_baseline, normalize_answer, vqa_accuracy

__all__ = [
    "CaptionMetrics",
    "DocumentMetrics",
    "PlanAccuracy",
    "field_f1",
    "most_common_json",
    "most_common_json_baseline",
    "normalized_edit_distance",
    "parse_plan",
    "step_accuracy",
    "ted_accuracy",
    "tree_edit_distance",
    "RetrievalRecall",
    "VQAAccuracy",
    "caption_scores",
    "majority_answer_baseline",
    "normalize_answer",
    "ptb_tokenize",
    "rerank",
    "retrieval_recall",
    "vqa_accuracy",
]
