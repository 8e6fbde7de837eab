"""Exact mid-epoch resume of the shard pipeline: the data position in the loader's state and a real
``kill -9`` of ``mmlm fit`` followed by ``--ckpt_path last``.

Loader-level tests cut an epoch after ``n`` batches, move the state into a fresh loader (as a
checkpoint does) and check that the keys before the cut plus those after it are exactly the
uninterrupted epoch, in order.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import webdataset as wds

from datamodules.base import WebDataModule
from datamodules.pipeline.skips import SkipSample


class KeysExample:
    """Sample → its ``__key__`` (``"bad"`` members are skipped and counted)."""

    def __call__(self, sample: dict, source: int) -> str:
        if "bad" in sample:
            raise SkipSample("bad_sample")
        return sample["__key__"]


class KeysModule(WebDataModule):
    """Batches are lists of sample keys: the pipeline without decoding."""

    def example_fn(self, stage, sources):
        return KeysExample()

    def collate_fn(self, stage):
        return list


class Urls:
    def __init__(self, urls: str, weight: float = 1.0) -> None:
        self.urls, self.weight = urls, weight


def write_set(directory: Path, prefix: str, shards: int, per_shard: int, bad_every: int = 0) -> str:
    """``shards`` tar files of ``per_shard`` tiny samples; every ``bad_every``-th one is bad."""
    directory.mkdir(parents=True, exist_ok=True)
    n = itertools.count()
    for s in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{s:05d}.tar")) as writer:
            for _ in range(per_shard):
                i = next(n)
                ext = "bad" if bad_every and i % bad_every == bad_every - 1 else "txt"
                writer.write({"__key__": f"{prefix}{i:04d}", ext: b"x"})
    return str(directory / f"{prefix}-*.tar")


def module(sources: list[Urls], **kwargs) -> KeysModule:
    args = dict(val=None, test=None, predict=None, batch_size=3, num_workers=0, epoch_samples=60,
                shuffle_buffer=0, resampled=False, seed=1)
    return KeysModule(train=sources, **{**args, **kwargs})


def epoch(dm: KeysModule, epoch: int = 0):
    dm.set_epoch(epoch)
    loader = dm.train_dataloader()
    return loader, iter(loader)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Urls]:
    root = tmp_path_factory.mktemp("resume")
    return [Urls(write_set(root, "a", 4, 7, bad_every=5)), Urls(write_set(root, "b", 4, 5), weight=0.5)]


@pytest.mark.parametrize("num_workers, shuffle_buffer, n_sources, cuts, resampled", [
    (0, 0, 2, [1, 7], False),   # no buffer: seek each source to its shard and offset
    (0, 6, 2, [4, 9], False),   # buffer: replay the raw stream up to the drawn count
    (2, 6, 1, [3, 6], False),   # two workers: per-worker positions, round-robin order kept
    (2, 0, 2, [5], False),
    (0, 0, 1, [8], True),       # shards drawn with replacement
])
def test_resume_continues_the_epoch_exactly(sources, num_workers, shuffle_buffer, n_sources, cuts, resampled):
    kwargs = dict(num_workers=num_workers, shuffle_buffer=shuffle_buffer, resampled=resampled)
    full = [b for b in epoch(module(sources[:n_sources], **kwargs), 1)[1]]
    assert len(full) == 60 // 3 and len({k for b in full for k in b}) >= 20
    for cut in cuts:
        dm = module(sources[:n_sources], **kwargs)
        loader, it = epoch(dm, 1)
        before = list(itertools.islice(it, cut))
        state = loader.state_dict()
        assert state["ranks"][0]["batches"] == cut
        resumed = module(sources[:n_sources], **kwargs)
        resumed.set_epoch(1)
        loader2 = resumed.train_dataloader()
        loader2.load_state_dict(state)
        after = list(loader2)
        assert before + after == full, f"cut after {cut} batches"
        # skip counts carried over: together exactly those of the uninterrupted epoch
        assert resumed.skip_counts() == epoch_counts(sources[:n_sources], kwargs)


def epoch_counts(sources: list[Urls], kwargs: dict) -> dict[str, int]:
    dm = module(sources, **kwargs)
    for _ in epoch(dm, 1)[1]:
        pass
    return dm.skip_counts()


def test_consumed_count_excludes_a_batch_fetched_ahead(sources):
    """Lightning fetches one batch ahead without a length: the state is the trainer's count, not ours."""
    dm = module(sources[:1], epoch_samples=None, shuffle_buffer=4)
    loader, it = epoch(dm)
    consumed = {"n": 0}
    loader.consumed_fn = lambda: consumed["n"]
    taken = list(itertools.islice(it, 3))  # the trainer has run 2, the third is prefetched
    consumed["n"] = 2
    state = loader.state_dict()
    fresh = module(sources[:1], epoch_samples=None, shuffle_buffer=4)
    loader2 = fresh.train_dataloader()
    loader2.load_state_dict(state)
    rest = list(loader2)
    full = list(epoch(module(sources[:1], epoch_samples=None, shuffle_buffer=4))[1])
    assert taken[:2] + rest == full


def test_a_state_for_another_epoch_or_worker_count_is_not_applied(sources):
    loader, it = epoch(module(sources[:1]), 0)
    next(it)
    state = loader.state_dict()
    other = module(sources[:1], num_workers=2).train_dataloader()
    with pytest.raises(ValueError, match="num_workers=1"):
        other.load_state_dict(state)
    dm = module(sources[:1])
    later = dm.train_dataloader()
    later.load_state_dict(state)
    dm.set_epoch(1)  # a checkpoint from epoch 0 does not cut epoch 1 short
    later.epoch_fn = lambda: 1
    assert len(list(later)) == 60 // 3


def test_changed_shards_make_the_replay_fail_loudly(tmp_path):
    urls = write_set(tmp_path, "c", 2, 6)
    dm = module([Urls(urls)], shuffle_buffer=4, epoch_samples=12)
    loader, it = epoch(dm)
    next(it), next(it)
    state = loader.state_dict()
    write_set(tmp_path, "c", 2, 3)  # shards rewritten shorter since the checkpoint
    loader2 = module([Urls(urls)], shuffle_buffer=4, epoch_samples=12).train_dataloader()
    loader2.load_state_dict(state)
    with pytest.raises(RuntimeError, match="cannot resume the data position"):
        list(loader2)


# -- kill -9 of a real `mmlm fit`, then --ckpt_path last -------------------------------------------

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BATCH, EPOCH_SAMPLES, CKPT_EVERY, KILL_AFTER = 4, 48, 3, 5


def fit_args(data: Path, root: Path, keys: Path, kill_after: int = -1, kill_signal: str = "SIGKILL",
             top_k: int = 1) -> list[str]:
    """``resume_probe.fit_command`` with this file's sizes: batch 4, 48 samples, a checkpoint every 3 steps."""
    from resume_probe import fit_command

    return fit_command(data, root, keys, batch=BATCH, samples=EPOCH_SAMPLES, every=CKPT_EVERY, kill_after=kill_after,
                       kill_signal=kill_signal, top_k=top_k)


def run(args: list[str], stderr: list[str] | None = None) -> int:
    """Exit status of the command (0, -9 for SIGKILL, 143 for a preempted run); its stderr is appended to
    ``stderr`` when given. Any other status fails the test with the output's tail."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if stderr is not None:
        stderr.append(proc.stderr)
    if proc.returncode not in (0, -9, 143):
        pytest.fail(f"mmlm fit exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc.returncode


def recorded(path: Path) -> list[tuple[int, list[str]]]:
    from resume_probe import recorded

    return recorded(path)


def uninterrupted_epoch(data: Path) -> list[list[str]]:
    from resume_probe import uninterrupted_epoch

    return uninterrupted_epoch(data, BATCH, EPOCH_SAMPLES)


def test_kill_9_mid_epoch_then_resume_from_last_sees_each_sample_once_in_order(tmp_path):
    import torch

    from datamodules.synthetic.shapes import write_shapes

    data = tmp_path / "data"
    write_shapes(data, train=24, val=0, seed=0, shard_size=4, progress=False)
    keys1, keys2 = tmp_path / "keys1.tsv", tmp_path / "keys2.tsv"
    assert run(fit_args(data, tmp_path / "run", keys1, kill_after=KILL_AFTER)) == -9
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step == CKPT_EVERY  # killed after step 5: steps 4 and 5 were lost with the process
    before = [keys for step, keys in recorded(keys1) if step <= saved_step]
    assert len(recorded(keys1)) == KILL_AFTER
    assert run(fit_args(data, tmp_path / "run", keys2) + ["--ckpt_path=last"]) == 0
    after = recorded(keys2)
    assert [step for step, _ in after] == list(range(saved_step + 1, EPOCH_SAMPLES // BATCH + 1))
    epoch = uninterrupted_epoch(data)
    assert before + [keys for _, keys in after] == epoch


@pytest.mark.parametrize("kill_signal", ["SIGTERM", "SIGUSR1"])
def test_preempted_fit_saves_the_step_it_stopped_at_exits_143_and_resumes_exactly(tmp_path, kill_signal):
    """SIGTERM (or SLURM's SIGUSR1) after step 5, between checkpoints of steps 3 and 6: the run saves
    step 5 as last.ckpt on the way out and exits 143, not 0; resuming trains steps 6.. and the keys
    trained before and after are exactly one uninterrupted epoch (nothing lost, nothing repeated)."""
    import torch

    from datamodules.synthetic.shapes import write_shapes

    data = tmp_path / "data"
    write_shapes(data, train=24, val=0, seed=0, shard_size=4, progress=False)
    keys1, keys2, err = tmp_path / "keys1.tsv", tmp_path / "keys2.tsv", []
    assert run(fit_args(data, tmp_path / "run", keys1, KILL_AFTER, kill_signal), err) == 143
    assert "stopped by SIGTERM" in err[0] and "--ckpt_path last" in err[0]
    assert torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == KILL_AFTER
    before = recorded(keys1)
    assert [step for step, _ in before] == list(range(1, KILL_AFTER + 1))
    assert run(fit_args(data, tmp_path / "run", keys2) + ["--ckpt_path=last"]) == 0
    after = recorded(keys2)
    assert [step for step, _ in after] == list(range(KILL_AFTER + 1, EPOCH_SAMPLES // BATCH + 1))
    assert [keys for _, keys in before + after] == uninterrupted_epoch(data)


def test_ckpt_path_last_passes_over_truncated_checkpoints_with_a_warning(tmp_path, capsys):
    """Killed after step 7 with checkpoints of steps 3 and 6 kept: last.ckpt and the step-6 file are cut
    short (a full disk); `--ckpt_path last` warns naming each, resumes from step 3 and still trains
    exactly one epoch of keys. A truncated checkpoint given by path stops with one message."""
    from datamodules.synthetic.shapes import write_shapes
    from mmlm.app.cli import main

    data = tmp_path / "data"
    write_shapes(data, train=24, val=0, seed=0, shard_size=4, progress=False)
    keys1, keys2, err = tmp_path / "keys1.tsv", tmp_path / "keys2.tsv", []
    assert run(fit_args(data, tmp_path / "run", keys1, kill_after=7, top_k=-1)) == -9
    ckpt = tmp_path / "run" / "ckpt"
    broken = [ckpt / "last.ckpt", *ckpt.glob("*step=6*.ckpt")]
    assert len(broken) == 2 and (ckpt / "epoch=0-step=3.ckpt").is_file()
    for path in broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert run(fit_args(data, tmp_path / "run", keys2, top_k=-1) + ["--ckpt_path=last"], err) == 0
    for path in broken:
        assert f"skipping checkpoint {path}" in err[0] and "not a complete checkpoint" in err[0]
    before = [keys for step, keys in recorded(keys1) if step <= 3]
    after = recorded(keys2)
    assert after[0][0] == 4
    assert before + [keys for _, keys in after] == uninterrupted_epoch(data)

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(fit_args(data, tmp_path / "run2", tmp_path / "keys3.tsv")[3:] + [f"--ckpt_path={broken[0]}"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"error: ckpt_path={str(broken[0])!r}: not a complete checkpoint (")
    assert not (tmp_path / "keys3.tsv").exists()


def test_ddp_kill_9_then_resume_is_exact_on_every_rank(tmp_path):
    """2 ranks × 2 workers (gloo): both SIGKILL themselves after step 3, the checkpoint of step 2
    holds both ranks' positions, and each rank then finishes exactly its own epoch."""
    import torch

    from datamodules import ImageTextDataModule, Source
    from datamodules.synthetic.shapes import write_shapes

    data = tmp_path / "data"
    write_shapes(data, train=24, val=0, seed=0, shard_size=4, progress=False)

    def ddp_args(keys: Path, kill_after: int = -1) -> list[str]:
        args = [a.replace('"every_n_train_steps": 3', '"every_n_train_steps": 2')
                for a in fit_args(data, tmp_path / "run", keys, kill_after) if a != "--trainer.devices=1"]
        return [*args, "--trainer.devices=2", "--trainer.strategy=ddp"]

    assert run(ddp_args(tmp_path / "k1.tsv", kill_after=3)) == -9
    saved_step = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved_step == 2
    assert run([*ddp_args(tmp_path / "k2.tsv"), "--ckpt_path=last"]) == 0
    train = [Source(f"{data}/train/vqa-*.tar", kind="vqa"), Source(f"{data}/train/captions-*.tar", weight=0.5)]
    for rank in range(2):
        dm = ImageTextDataModule(train=train, tokenizer=str(data / "tokenizer"), image_size=8, batch_size=BATCH,
                                 epoch_samples=EPOCH_SAMPLES, num_workers=2, shuffle_buffer=8, seed=0)
        dm.setup("fit")
        epoch = [b.keys for b in dm.make_loader(dm.build_pipeline("fit", train, rank=rank, world_size=2))]
        before = [keys for step, keys in recorded(tmp_path / f"k1.rank{rank}") if step <= saved_step]
        after = [keys for _, keys in recorded(tmp_path / f"k2.rank{rank}")]
        assert before + after == epoch, f"rank {rank}"
