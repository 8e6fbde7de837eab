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
    from mmlm.app.lightning import lightning_cli

    args = ["--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule", "--trainer.accelerator=cpu",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    assert isinstance(lightning_cli(args, run=False).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    plain = "--trainer.plugins=lightning_fabric.plugins.io.torch_io.TorchCheckpointIO"
    assert type(lightning_cli([*args, plain], run=False).trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


class NotPlainData:
    """An object ``weights_only=True`` refuses to unpickle (a checkpoint could run code through it)."""


def test_load_checkpoint_file_names_the_file_and_what_is_wrong(tmp_path):
    from mmlm.checkpointing import CheckpointError, checkpoint_problem, load_checkpoint_file

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, good)
    assert checkpoint_problem(good) is None
    assert load_checkpoint_file(good)["global_step"] == 7
    cut, empty, unsafe = tmp_path / "cut.ckpt", tmp_path / "empty.ckpt", tmp_path / "unsafe.ckpt"
    cut.write_bytes(good.read_bytes()[:300])
    empty.touch()
    torch.save({"state_dict": {}, "extra": NotPlainData()}, unsafe)
    cases = {tmp_path / "missing.ckpt": "no such checkpoint file", empty: "the file is empty",
             cut: "not a complete checkpoint (300 bytes", unsafe: "not plain data and is not unpickled"}
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint_file(path)
        assert str(err.value).startswith(f"checkpoint {str(path)!r}") and expected in str(err.value)


def test_newest_checkpoint_passes_over_cut_files_with_a_warning(tmp_path, caplog):
    from mmlm.app.reliability import newest_checkpoint

    old, mid, new = (tmp_path / "v0" / "a.ckpt", tmp_path / "v1" / "b.ckpt", tmp_path / "v1" / "last.ckpt")
    for age, path in enumerate([old, mid, new]):
        path.parent.mkdir(exist_ok=True)
        torch.save({"global_step": age}, path)
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert newest_checkpoint(tmp_path) == new
    new.write_bytes(new.read_bytes()[:100])
    mid.write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert newest_checkpoint(tmp_path) == old
    assert f"skipping checkpoint {new} for --ckpt_path last: not a complete checkpoint" in caplog.text
    assert f"skipping checkpoint {mid} for --ckpt_path last: the file is empty" in caplog.text
    old.unlink()
    assert newest_checkpoint(tmp_path) is None


def test_validate_by_a_cut_checkpoint_path_stops_with_one_message(tmp_path, capsys):
    """No model config given: the model would come from the checkpoint itself, which is named, not unpickled."""
    from mmlm.app.cli import main

    cut = tmp_path / "epoch=0-step=9.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, cut)
    cut.write_bytes(cut.read_bytes()[:-40])
    with pytest.raises(SystemExit):
        main(["validate", f"--ckpt_path={cut}"])
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"mmlm validate: error: ckpt_path={str(cut)!r}: not a complete checkpoint "
                                        f"({cut.stat().st_size:,} bytes without the end of a torch.save archive: "
                                        "truncated by a full disk or a kill, or not a checkpoint)"]
    assert "Traceback" not in err


def test_ckpt_path_last_with_only_broken_checkpoints_is_refused_not_started_over(tmp_path):
    from mmlm.app.reliability import last_checkpoint
    from mmlm.checkpointing import CheckpointError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = {"ckpt_path": "last", "trainer": {"default_root_dir": str(tmp_path), "callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(folder)}}]}}
    assert last_checkpoint(config) is None  # nothing saved yet: the first launch starts from scratch
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match=rf"none of the 1 checkpoint\(s\) under {folder} can be read"):
        last_checkpoint(config)
    torch.save({"global_step": 2}, folder / "epoch=0-step=2.ckpt")
    assert last_checkpoint(config) == folder / "epoch=0-step=2.ckpt"
