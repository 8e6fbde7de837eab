"""Evaluation metrics as torchmetrics ``Metric`` subclasses (DDP-safe)."""

from mmlm.metrics.captioning import CaptionMetrics, caption_scores, ptb_tokenize
from mmlm.metrics.retrieval import RetrievalRecall, rerank, retrieval_recall
from mmlm.metrics.vqa import VQAAccuracy, majority_answer_baseline, normalize_answer, vqa_accuracy

__all__ = [
    "CaptionMetrics",
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
