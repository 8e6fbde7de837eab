"""Evaluation metrics as torchmetrics ``Metric`` subclasses (DDP-safe)."""

from mmlm.metrics.captioning import (
    CAPTION_SCORE_KEYS,
    CaptionMetrics,
    caption_scores,
    java_ptb_tokenize,
    ptb_tokenize,
    resolve_caption_tokenizer,
)
from mmlm.metrics.documents import (
    AnswerMetrics,
    DocumentMetrics,
    anls,
    exact_match,
    field_f1,
    most_common_json,
    most_common_json_baseline,
    normalized_edit_distance,
    score_answer,
    score_document,
    ted_accuracy,
    tree_edit_distance,
)
from mmlm.metrics.plans import PlanAccuracy, parse_plan, step_accuracy
from mmlm.metrics.retrieval import RetrievalRecall, rerank, retrieval_recall
from mmlm.metrics.vqa import (
    VQAAccuracy,
    majority_answer_baseline,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_normalized,
    vqa_summary,
)

__all__ = [
    "AnswerMetrics",
    "CAPTION_SCORE_KEYS",
    "CaptionMetrics",
    "java_ptb_tokenize",
    "resolve_caption_tokenizer",
    "DocumentMetrics",
    "anls",
    "exact_match",
    "score_answer",
    "score_document",
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
    "vqa_accuracy_normalized",
    "vqa_summary",
]
