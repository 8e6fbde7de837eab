"""Progress of mmlm runs (mmlm/app/progress.py): bar totals from max_steps and epoch_samples, evaluation totals from
the shards' sample count, plain lines when stdout is not a terminal, and the data tools' bars."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest

from mmlm.app.progress import (
    PlainProgress,
    RunProgressBar,
    estimated_batches,
    progress_bar_for,
    shard_samples,
)


def bar_on(**trainer: object) -> RunProgressBar:
    """A :class:`RunProgressBar` attached to a stand-in trainer with the given attributes."""
    defaults = {"max_steps": -1, "max_epochs": None, "global_step": 0, "num_training_batches": math.inf,
                "accumulate_grad_batches": 1}
    bar = RunProgressBar()
    bar._trainer = SimpleNamespace(**{**defaults, **trainer})
    return bar


def test_training_total_comes_from_max_steps_and_the_epoch_length():
    # epoch_samples 1,000,000 at batch 64 = 15,625 batches per epoch; max_steps 2,000 ends the run first
    assert bar_on(max_steps=2000, max_epochs=-1, num_training_batches=15625).total_train_batches == 2000
    assert bar_on(max_steps=2000, max_epochs=-1, num_training_batches=15625, global_step=1500).total_train_batches == 500
    # max_epochs given as well: Lightning's own bar would show the whole epoch
    assert bar_on(max_steps=10, max_epochs=3, num_training_batches=100).total_train_batches == 10
    # no epoch_samples (a one-pass loader of unknown length): max_steps alone; accumulation counts batches
    assert bar_on(max_steps=10, accumulate_grad_batches=4).total_train_batches == 40
    # an epoch-bounded run: the epoch's length
    assert bar_on(max_epochs=3, num_training_batches=100).total_train_batches == 100


def test_the_epoch_description_has_no_negative_count():
    assert bar_on(max_steps=2000, max_epochs=-1)._get_train_description(1).strip() == "Epoch 1"
    assert bar_on(max_epochs=3)._get_train_description(1).strip() == "Epoch 1/2"


def test_evaluation_total_is_estimated_from_the_shards_sample_count(shapes_data):
    from datamodules import ImageTextDataModule
    from datamodules.image_text import Source

    urls = str(shapes_data / "val" / "vqa-*.tar")
    module = ImageTextDataModule(val=[Source(urls, kind="vqa")], tokenizer=str(shapes_data / "tokenizer"),
                                 image_size=32, batch_size=8)
    loader = module.val_dataloader()
    batches = sum(1 for _ in loader)
    assert batches > 1
    assert estimated_batches(loader) == batches
    assert estimated_batches([1, 2, 3]) == math.inf  # not a shard loader: the bar stays open-ended
    assert shard_samples("https://example.com/a.tar") is None


def test_the_display_follows_the_stream():
    assert isinstance(progress_bar_for(io.StringIO()), PlainProgress)
    tty = SimpleNamespace(isatty=lambda: True)
    assert isinstance(progress_bar_for(tty), RunProgressBar)


@pytest.mark.parametrize("tool", ["synth-docs", "synth-receipts"])
def test_document_tools_show_progress(tool, tmp_path, capsys):
    from mmlm.app.cli import main

    assert main(["data", tool, "--out", str(tmp_path / "out"), "--train", "3", "--val", "2",
                 "--layout", "folder"]) == 0
    captured = capsys.readouterr()
    assert "rendering train" in captured.err and "100%" in captured.err
    assert captured.out.lstrip().startswith("{")  # the JSON summary alone on stdout

    assert main(["data", "convert-donut", str(tmp_path / "out" / "donut"), "--out", str(tmp_path / "shards")]) == 0
    assert "converting" in capsys.readouterr().err
