"""MultimodalModule's shared evaluation: a family adds a task through ``evaluation_metrics``/``prediction_row``,
and every rank gathers every task's predictions in one order (a rank without rows of a task must still join)."""

from __future__ import annotations

import torch

from mmlm.batch import Batch
from mmlm.metrics import PlanAccuracy
from mmlm.models import base


class WithPlans(base.MultimodalModule):
    def __init__(self) -> None:
        super().__init__()
        self.plan_metric = PlanAccuracy()

    def evaluation_metrics(self):
        return {**super().evaluation_metrics(), "plan": self.plan_metric}

    def prediction_row(self, task, sample_id, text, references):
        if task == "plan":
            return {"id": sample_id, "plan": text}
        return super().prediction_row(task, sample_id, text, references)


def batch(tasks: list[str]) -> Batch:
    n = len(tasks)
    empty = torch.zeros(n, 1, dtype=torch.long)
    return Batch(pixels=torch.zeros(n, 3, 4, 4), input_ids=empty, attention_mask=empty, labels=empty,
                 prompt_ids=empty, prompt_mask=empty, keys=[str(i) for i in range(n)], tasks=tasks,
                 references=[["x"]] * n, ids=[f"id{i}" for i in range(n)])


def test_rows_go_to_their_task_in_its_format():
    module = WithPlans()
    module._record(batch(["vqa", "plan", "caption", "other"]), ["a", "1. pick red", "c", "d"])
    assert module._predictions == {"vqa": [{"question_id": "id0", "answer": "a"}],
                                   "plan": [{"id": "id1", "plan": "1. pick red"}],
                                   "caption": [{"image_id": "id2", "caption": "c"}, {"image_id": "id3", "caption": "d"}]}


def test_every_task_is_gathered_in_one_order_even_without_rows(monkeypatch):
    gathered = []
    monkeypatch.setattr(base, "gather_objects", lambda rows: gathered.append(len(rows)) or rows)
    module = WithPlans()
    module._record(batch(["vqa"]), ["a"])
    module._write_predictions("val")
    assert gathered == [1, 0, 0]  # vqa, caption, plan: one collective each, on every rank alike
    assert module._predictions == {}
