"""The LR schedules of :class:`MultimodalModule`: linear warmup, then cosine (default) or linear decay to
``lr * min_lr_ratio``, checked value by value and through a short ``fit``."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mmlm.models.base import ModuleSettings, MultimodalModule, warmup_cosine, warmup_linear


class Toy(MultimodalModule):
    """One linear layer; the loss is its output's mean."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.layer = torch.nn.Linear(4, 1)

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.layer(batch).mean()


class RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_warmup_linear_values():
    factor = warmup_linear(warmup_steps=2, total_steps=6, min_lr_ratio=0.2)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.8, 4: 0.6, 5: 0.4, 6: 0.2, 9: 0.2}
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, abs=1e-12), step
    assert warmup_linear(0, 4, 0.0)(0) == 1.0 and warmup_linear(0, 4, 0.0)(4) == 0.0


@pytest.mark.parametrize("schedule,factor", [("linear", warmup_linear), ("cosine", warmup_cosine)])
def test_lr_follows_the_schedule_through_a_trainer(schedule, factor, tmp_path):
    torch.manual_seed(0)
    module = Toy(lr=0.01, warmup_steps=2, min_lr_ratio=0.1, schedule=schedule)
    record = RecordLR()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         log_every_n_steps=1000, callbacks=[record])
    trainer.fit(module, DataLoader(torch.randn(12, 4), batch_size=2))
    expected = [0.01 * factor(2, 6, 0.1)(step) for step in range(6)]
    assert record.lrs == pytest.approx(expected, abs=1e-12)
    if schedule == "linear":  # warmup 0.005, 0.01, then 0.01 → 0.001 in equal steps of 0.00225
        assert record.lrs == pytest.approx([0.005, 0.01, 0.01, 0.00775, 0.0055, 0.00325], abs=1e-12)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule='step'"):
        Toy(schedule="step")
    assert "schedule" in ModuleSettings.__annotations__
