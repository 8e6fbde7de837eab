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

from datamodules.base import SkipSample, WebDataModule


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


def fit_args(data: Path, root: Path, keys: Path, kill_after: int = -1) -> list[str]:
    """``mmlm fit`` of ``resume_probe.KeyModel`` on mixed caption + VQA shapes shards, 2 workers, a
    shuffle buffer, a checkpoint (``last.ckpt``) every ``CKPT_EVERY`` steps and the key recorder."""
    import json
    import sys

    train = [{"urls": f"{data}/train/vqa-*.tar", "kind": "vqa"},
             {"urls": f"{data}/train/captions-*.tar", "kind": "caption", "weight": 0.5}]
    checkpoint = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": CKPT_EVERY, "save_last": True}}
    recorder = {"class_path": "resume_probe.KeyRecorder", "init_args": {"path": str(keys), "kill_after_step": kill_after}}
    return [sys.executable, "-m", "mmlm.cli", "fit", "--seed_everything=0", "--model=resume_probe.KeyModel",
            "--data=datamodules.ImageTextDataModule", f"--data.init_args.train={json.dumps(train)}",
            f"--data.init_args.tokenizer={data / 'tokenizer'}", "--data.init_args.image_size=8",
            f"--data.init_args.batch_size={BATCH}", f"--data.init_args.epoch_samples={EPOCH_SAMPLES}",
            "--data.init_args.num_workers=2", "--data.init_args.shuffle_buffer=8",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_epochs=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}", f"--trainer.callbacks+={json.dumps(checkpoint)}",
            f"--trainer.callbacks+={json.dumps(recorder)}"]


def run(args: list[str]) -> int:
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode not in (0, -9):
        pytest.fail(f"mmlm fit exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc.returncode


def recorded(path: Path) -> list[tuple[int, list[str]]]:
    """``(global_step after the batch, keys)`` per training batch the recorder saw."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [(int(step), keys.split()) for step, keys in rows]


def uninterrupted_epoch(data: Path) -> list[list[str]]:
    """Keys per batch of epoch 0 with the same data settings, straight from the datamodule."""
    from datamodules import ImageTextDataModule, Source

    train = [Source(f"{data}/train/vqa-*.tar", kind="vqa"), Source(f"{data}/train/captions-*.tar", weight=0.5)]
    dm = ImageTextDataModule(train=train, tokenizer=str(data / "tokenizer"), image_size=8, batch_size=BATCH,
                             epoch_samples=EPOCH_SAMPLES, num_workers=2, shuffle_buffer=8, seed=0)
    dm.setup("fit")
    return [batch.keys for batch in dm.train_dataloader()]


def test_kill_9_mid_epoch_then_resume_from_last_sees_each_sample_once_in_order(tmp_path):
    import torch

    from datamodules.synthetic.shapes import write_shapes

    data = tmp_path / "data"
    write_shapes(data, train=24, val=0, seed=0, shard_size=4, progress=False)
    keys1, keys2 = tmp_path / "keys1.tsv", tmp_path / "keys2.tsv"
    assert run(fit_args(data, tmp_path / "run", keys1, kill_after=KILL_AFTER)) == -9
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    saved_step = torch.load(last, weights_only=False)["global_step"]
    assert saved_step == CKPT_EVERY  # killed after step 5: steps 4 and 5 were lost with the process
    before = [keys for step, keys in recorded(keys1) if step <= saved_step]
    assert len(recorded(keys1)) == KILL_AFTER
    assert run(fit_args(data, tmp_path / "run", keys2) + ["--ckpt_path=last"]) == 0
    after = recorded(keys2)
    assert [step for step, _ in after] == list(range(saved_step + 1, EPOCH_SAMPLES // BATCH + 1))
    epoch = uninterrupted_epoch(data)
    assert before + [keys for _, keys in after] == epoch


@pytest.mark.skipif(not __import__("os").environ.get("MMLM_SLOW_TESTS"),
                    reason="2-process DDP kill/resume takes ~1-2 min of CPU; set MMLM_SLOW_TESTS=1")
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
    saved_step = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
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
