"""Plan metrics: parsing numbered steps, exact match, per-step accuracy, sums across updates."""

from __future__ import annotations

import pytest
import torch

from mmlm.metrics.plans import PlanAccuracy, parse_plan, step_accuracy

PLAN = "1. pick green block 2. place on table 3. pick red block 4. place on blue block"


def test_parse_plan_splits_numbered_steps_and_normalises():
    assert parse_plan(PLAN) == ["pick green block", "place on table", "pick red block", "place on blue block"]
    assert parse_plan("1 . Pick green block 2 . place on TABLE .") == ["pick green block", "place on table"]
    assert parse_plan("2) pick red block") == ["pick red block"]
    assert parse_plan("pick red block") == ["pick red block"]
    assert parse_plan("") == [] and parse_plan("1.") == []


def test_step_accuracy_counts_positions_over_the_longer_plan():
    assert step_accuracy(["a", "b"], ["a", "b"]) == 1.0
    assert step_accuracy(["a", "x"], ["a", "b"]) == 0.5
    assert step_accuracy(["a"], ["a", "b", "c", "d"]) == 0.25
    assert step_accuracy(["b", "a"], ["a", "b"]) == 0.0
    assert step_accuracy([], []) == 1.0


def test_plan_accuracy_accumulates_exact_match_and_step_accuracy():
    metric = PlanAccuracy()
    metric.update([PLAN, "1. pick red block 2. place on blue block"], [PLAN, [PLAN]])
    metric.update(["1 . pick green block 2 . place on table 3 . pick red block 4 . place on blue block"], [PLAN])
    out = metric.compute()
    assert out["plan_exact"].item() == pytest.approx(2 / 3)
    assert out["plan_step_acc"].item() == pytest.approx((1 + 0 + 1) / 3)  # shifted steps match nowhere
    metric.reset()
    metric.update(["1. pick green block 2. place on blue block"], [PLAN])
    assert metric.compute()["plan_step_acc"].item() == pytest.approx(0.25)


def test_plan_accuracy_checks_lengths_and_is_zero_when_empty():
    metric = PlanAccuracy()
    assert metric.compute()["plan_exact"] == torch.tensor(0.0)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["a", "b"], ["a"])
