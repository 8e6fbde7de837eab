"""Non-finite losses: a NaN/inf step is skipped (no weight, optimizer-state or BatchNorm change), counted and
logged; ``max_nonfinite_steps`` in a row stop the run with a message naming the step and the batch keys."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from mmlm.batch import Batch
from mmlm.models.base import MultimodalModule, NonFiniteLossError


class TinyRegressor(MultimodalModule):
    """Conv + BatchNorm + linear head: loss = mean squared output. NaN pixels give a NaN loss."""

    def __init__(self, **kwargs) -> None:
        super().__init__(lr=0.1, warmup_steps=0, **kwargs)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 1))

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.net(batch.pixels).pow(2).mean()


def make_batch(step: int, bad: bool) -> Batch:
    """A 2-example batch with keys ``s{step}-{i}``; ``bad``: NaN pixels (so the loss is NaN)."""
    pixels = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(step))
    if bad:
        pixels[0, 0, 0, 0] = float("nan")
    ids = torch.ones(2, 3, dtype=torch.long)
    return Batch(pixels=pixels, input_ids=ids, attention_mask=ids, labels=ids, prompt_ids=ids, prompt_mask=ids,
                 keys=[f"s{step}-{i}" for i in range(2)])


class Recorder(pl.Callback):
    """After every step: parameters, BatchNorm buffers and the optimizer state."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.states.append({"params": {n: p.detach().clone() for n, p in module.named_parameters()},
                            "buffers": {n: b.clone() for n, b in module.named_buffers()},
                            "optim": copy.deepcopy(trainer.optimizers[0].state_dict()["state"])})


def fit(module: MultimodalModule, bad: list[bool], callbacks: list[pl.Callback], accumulate: int = 1) -> pl.Trainer:
    batches = [make_batch(i, b) for i, b in enumerate(bad)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(bad) // accumulate, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         callbacks=callbacks, accumulate_grad_batches=accumulate)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_optim(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_nonfinite_steps_leave_weights_optimizer_and_batchnorm_untouched_and_are_counted():
    torch.manual_seed(0)
    bad = [False, True, False, True, True, False]
    recorder = Recorder()
    module = TinyRegressor(max_nonfinite_steps=3)
    trainer = fit(module, bad, [recorder])
    states = recorder.states
    assert len(states) == len(bad)
    for step in range(1, len(bad)):
        kept = (same(states[step]["params"], states[step - 1]["params"])
                and same(states[step]["buffers"], states[step - 1]["buffers"])
                and same_optim(states[step]["optim"], states[step - 1]["optim"]))
        assert kept == bad[step], f"step {step}: bad={bad[step]} but state kept={kept}"
    assert all(torch.isfinite(b).all() for b in states[-1]["buffers"].values())
    assert module.nonfinite_skipped == 3
    assert trainer.callback_metrics["train/skipped_nonfinite_loss"] == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_a_nonfinite_micro_batch_skips_its_whole_accumulation_window():
    torch.manual_seed(0)
    recorder = Recorder()
    module = TinyRegressor()
    fit(module, [False, False, True, False, False, False], [recorder], accumulate=2)  # windows (0,1) (2,3) (4,5)
    params = [state["params"] for state in recorder.states]
    assert not same(params[1], params[0])  # window 1 stepped
    assert same(params[3], params[1])  # window 2 (NaN in its first micro-batch) did not
    assert not same(params[5], params[3]) and all(torch.isfinite(p).all() for p in params[5].values())
    assert module.nonfinite_skipped == 1


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_naming_step_and_keys():
    torch.manual_seed(0)
    module = TinyRegressor(max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError) as info:
        fit(module, [False, True, False, True, True, False], [])
    message = str(info.value)
    assert "2 training step(s) in a row" in message and "max_nonfinite_steps=2" in message
    assert "global step 4" in message and "batch 4" in message
    assert "['s4-0', 's4-1']" in message and "nan" in message
    assert module.nonfinite_skipped == 3


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        TinyRegressor(max_nonfinite_steps=0)


class SaveOutcome(pl.Callback):
    """At the end of fit, each rank writes its skip count and parameters to ``out/rank{r}.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, module) -> None:
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        torch.save({"skipped": module.nonfinite_skipped, "params": params}, f"{self.out}/rank{trainer.global_rank}.pt")


def test_under_ddp_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """2 CPU ranks (gloo): batch 3 (rank 1's second step) is NaN; both ranks skip that step, none hangs, the
    replicas stay identical."""
    torch.manual_seed(0)
    batches = [make_batch(i, bad=i == 3) for i in range(8)]  # DistributedSampler: rank r gets r, r+2, …
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SaveOutcome(str(tmp_path))])
    trainer.fit(TinyRegressor(), torch.utils.data.DataLoader(batches, batch_size=None))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert same(ranks[0]["params"], ranks[1]["params"])
    assert all(torch.isfinite(p).all() for p in ranks[0]["params"].values())


def test_module_settings_name_every_argument_of_the_base():
    """``ModuleSettings`` (the ``**settings`` of ``Blip2.from_hf``/``Donut.from_hf``) cannot drift from the base."""
    import inspect

    from mmlm.models.base import ModuleSettings, MultimodalModule

    params = [name for name in inspect.signature(MultimodalModule.__init__).parameters if name != "self"]
    assert list(ModuleSettings.__annotations__) == params
