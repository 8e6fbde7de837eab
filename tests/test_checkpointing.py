"""Atomic checkpoint writes: an interrupted or killed save leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmlm.checkpointing import AtomicCheckpointIO, atomic_torch_save

REPO = Path(__file__).resolve().parents[1]

# A child that saves checkpoint A, then starts saving B and is SIGKILLed while B is being serialised
# (an object in B kills the process when pickled), with the writer named on the command line.
KILLED_WRITER = textwrap.dedent('''
    import os, signal, sys, torch
    from mmlm.checkpointing import AtomicCheckpointIO

    class KillWhenPickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    path = sys.argv[2]
    save = AtomicCheckpointIO().save_checkpoint if sys.argv[1] == "atomic" else torch.save
    save({"step": 1, "w": torch.arange(4.0)}, path)
    save({"step": 2, "w": torch.zeros(100_000), "z": KillWhenPickled()}, path)
''')


def killed_during_second_save(writer: str, path: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, writer, str(path)], env=env, timeout=120,
                          capture_output=True, text=True)
    return proc.returncode


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    assert killed_during_second_save("atomic", path) == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert leftovers and all(name.startswith(".last.ckpt.tmp-") for name in leftovers)  # the half-written temp
    atomic_torch_save({"step": 3}, path)  # the next save removes the dead writer's temp file
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_same_kill_corrupts_a_plain_torch_save(tmp_path):
    """Control: the kill really lands mid-save (a direct write loses the old checkpoint)."""
    path = tmp_path / "last.ckpt"
    assert killed_during_second_save("plain", path) == -signal.SIGKILL
    with pytest.raises(Exception):  # noqa: B017 - any load error: truncated zip, EOF…
        torch.load(path, weights_only=True)


def test_an_exception_during_save_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "epoch=0.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=0.ckpt"]


def test_mmlm_fit_writes_checkpoints_atomically_by_default(tmp_path):
    from mmlm.cli import lightning_cli

    args = ["--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule", "--trainer.accelerator=cpu",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    assert isinstance(lightning_cli(args, run=False).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    plain = "--trainer.plugins=lightning_fabric.plugins.io.torch_io.TorchCheckpointIO"
    assert type(lightning_cli([*args, plain], run=False).trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"
