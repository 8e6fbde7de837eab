"""Classification of whole examples (VLMO's NLVR2-style pair reasoning): loss per batch, accuracy per epoch.

The module provides ``classify(batch) -> (logits [B, C], targets [B])``. Logs ``{stage}/loss`` (cross-entropy) and
``{stage}/accuracy`` (share of argmax predictions equal to the targets, summed across ranks); ``predict`` returns
``{"id", "prediction", "probabilities"}`` rows and writes them to ``{stage}-classification-step{N}.json``.
Shape legend: B batch, C classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from mmlm.distributed import any_rank, gather_objects
from mmlm.evaluation.base import Evaluator, ResultFiles, StepOutput


class ClassificationEvaluator(Evaluator):
    """Cross-entropy and accuracy of ``module.classify(batch)`` (see the module docstring)."""

    main_metric = "accuracy"

    def __init__(self) -> None:
        super().__init__()
        self.accuracy = MeanMetric()
        self._rows: list[dict[str, Any]] = []

    @torch.no_grad()
    def step(self, module: Any, batch: Any, stage: str) -> StepOutput:
        logits, targets = module.classify(batch)
        probabilities = logits.float().softmax(dim=-1)
        keys = list(getattr(batch, "keys", None) or range(len(batch)))
        rows = [{"id": key, "prediction": int(p.argmax()), "probabilities": [round(float(x), 6) for x in p]}
                for key, p in zip(keys, probabilities)]
        self._rows += rows
        if stage == "predict":
            return StepOutput(rows=rows)
        self.accuracy.update((logits.argmax(dim=-1) == targets).float())
        return StepOutput(logs={"loss": F.cross_entropy(logits.float(), targets)}, rows=rows)

    def finish(self, module: Any, stage: str, files: ResultFiles) -> dict[str, Tensor | float]:
        rows, self._rows = gather_objects(self._rows), []
        files.write_json("classification", rows)
        metrics: dict[str, Tensor | float] = {}
        if any_rank(bool(self.accuracy.update_called), module.device):
            metrics["accuracy"] = float(self.accuracy.compute())
        self.accuracy.reset()
        return metrics
