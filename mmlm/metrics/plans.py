"""Plan metrics: exact match of a whole plan and per-step accuracy (PaLM-E's manipulation plans).

A plan is text with numbered steps, ``"1. pick red block 2. place on blue block"``. Both the
prediction and the reference are split at the step numbers and each step is normalised (lower
case, words only), so ``"1 . Pick red block"`` (a word-level tokenizer's decoding) matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

_STEP_NUMBER = re.compile(r"(?:^|\s)\d+\s*[.)]")
_WORD = re.compile(r"[a-z0-9]+")


def parse_plan(text: str) -> list[str]:
    """The normalised steps of ``text``: split at ``"N."``/``"N)"``, lower-cased, punctuation dropped.

    Text without step numbers is one step; empty steps are dropped.
    """
    parts = _STEP_NUMBER.split(text.lower())
    steps = [" ".join(_WORD.findall(part)) for part in parts]
    return [s for s in steps if s]


def step_accuracy(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Share of step positions where both plans agree, over the longer plan (1.0 for two empty plans)."""
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0
    return sum(p == r for p, r in zip(prediction, reference)) / longest


class PlanAccuracy(Metric):
    """Exact match of plans and mean per-step accuracy (see :func:`step_accuracy`), summed across ranks.

    ``compute()`` returns ``{"plan_exact": …, "plan_step_acc": …}`` in ``[0, 1]``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("exact", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("steps", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add plans; a reference may be one string or a list whose first string is the reference plan."""
        if len(predictions) != len(references):
            raise ValueError(f"PlanAccuracy.update: {len(predictions)} predictions but {len(references)} references")
        for prediction, reference in zip(predictions, references):
            ref = parse_plan(reference if isinstance(reference, str) else reference[0])
            pred = parse_plan(prediction)
            self.exact += float(pred == ref)
            self.steps += step_accuracy(pred, ref)
        self.count += len(predictions)

    def compute(self) -> dict[str, Tensor]:
        """``plan_exact`` and ``plan_step_acc`` (0 when nothing was added)."""
        count = self.count.clamp(min=1)
        return {"plan_exact": (self.exact / count).float(), "plan_step_acc": (self.steps / count).float()}
