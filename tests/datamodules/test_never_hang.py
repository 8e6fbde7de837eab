"""A one-pass run over data that yields no usable sample stops with an error instead of looping forever.

Each CLI case runs ``mmlm fit --config configs/tiny/frozen.yaml`` (tiny parts) in a subprocess with a timeout, so a
regression fails the test instead of hanging CI (the loop these guard against ran for 594 s before being killed).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from datamodules.base import WebDataModule
from datamodules.pipeline.loader import EmptyEpochError

ROOT = Path(__file__).resolve().parents[2]
#: Seconds one CLI case may take: startup and model building take ~10 s here; a hang is killed at this limit.
LIMIT = 240


def tiny_frozen_config(path: Path, shapes_data: Path, tiny_gpt2: dict, tiny_resnet: dict) -> Path:
    """``configs/tiny/frozen.yaml`` with tiny parts (a random 2-layer GPT-2 instead of the text stage's export)."""
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "frozen.yaml").read_text())
    model = config["model"]["init_args"]
    model["tokenizer"] = str(shapes_data / "tokenizer")
    model["language_model"]["init_args"] = {"config": tiny_gpt2}
    model["encoder"]["init_args"].update(img_size=32, model_kwargs=tiny_resnet)
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(shapes_data: Path, urls: str, root: Path, tiny_gpt2: dict, tiny_resnet: dict) -> list[str]:
    """``mmlm fit`` on the tiny Frozen config, one pass (no ``epoch_samples``) over ``urls``, at most 5 steps."""
    root.mkdir(parents=True, exist_ok=True)
    config = tiny_frozen_config(root / "frozen.yaml", shapes_data, tiny_gpt2, tiny_resnet)
    return ["fit", "--config", str(config),
            "--data.init_args.train", json.dumps([{"urls": urls, "kind": "caption"}]),
            "--data.init_args.val", "null", "--data.init_args.epoch_samples", "null",
            "--data.init_args.resampled", "false", "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "2", "--data.init_args.shuffle_buffer", "0",
            "--trainer.max_steps", "5", "--trainer.val_check_interval", "5", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(root)]


def run_cli(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m mmlm.app.cli ARGS`` with :data:`LIMIT` (``TimeoutExpired`` fails the test); returns it and seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mmlm.app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=LIMIT)
    return done, time.perf_counter() - start


def bad_image_tar(path: Path, count: int) -> None:
    """A shard whose every sample has a caption and an image that does not decode."""
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            writer.write({"__key__": f"{i:09d}", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"a red circle"})


def test_an_empty_tar_stops_the_run_naming_the_shard(shapes_data, tmp_path, tiny_gpt2, tiny_resnet):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    done, seconds = run_cli(fit_args(shapes_data, str(empty), tmp_path / "run", tiny_gpt2, tiny_resnet))
    assert done.returncode == 1, done.stdout[-2000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("mmlm fit: error: ")]
    assert len(message) == 1 and "yielded no batch" in message[0] and f"{str(empty)!r} (1 shard)" in message[0]
    assert "Traceback" not in done.stderr
    assert seconds < LIMIT


def test_a_tar_of_bad_samples_stops_the_run_with_the_skip_counts(shapes_data, tmp_path, tiny_gpt2, tiny_resnet):
    bad = tmp_path / "bad.tar"
    bad_image_tar(bad, 6)
    done, _ = run_cli(fit_args(shapes_data, str(bad), tmp_path / "run", tiny_gpt2, tiny_resnet))
    assert done.returncode == 1
    assert "yielded no batch" in done.stderr and "bad_image 6" in done.stderr and str(bad) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_folder_as_urls_is_refused_before_anything_is_built(shapes_data, tmp_path, tiny_gpt2, tiny_resnet):
    folder = tmp_path / "shards"
    folder.mkdir()
    bad_image_tar(folder / "captions-00000.tar", 2)
    done, _ = run_cli(fit_args(shapes_data, str(folder), tmp_path / "run", tiny_gpt2, tiny_resnet))
    assert done.returncode == 2
    assert "data.init_args.train[0].urls" in done.stderr and "is a folder, not a shard" in done.stderr
    assert repr(str(folder / "captions-*.tar")) in done.stderr  # the pattern that would name its shards
    assert "Traceback" not in done.stderr


# -- loader level (fast) --------------------------------------------------------------------------------------------


class Keys(WebDataModule):
    """Batches are lists of keys; samples without ``txt`` are skipped (``empty``)."""

    def example_fn(self, stage, sources):
        return key_of

    def collate_fn(self, stage):
        return list


def key_of(sample: dict, source: int) -> str:
    from datamodules.pipeline.skips import SkipSample

    if "txt" not in sample:
        raise SkipSample("empty")
    return sample["__key__"]


class Urls:
    def __init__(self, urls: str) -> None:
        self.urls, self.weight = urls, 1.0


def keys_module(urls: str, **kwargs) -> Keys:
    args = dict(val=None, test=None, predict=None, batch_size=2, num_workers=0, epoch_samples=None,
                shuffle_buffer=0, resampled=False, seed=0)
    return Keys(train=[Urls(urls)], **{**args, **kwargs})


def one_sample_tar(path: Path, member: str) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(f"000000000.{member}")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_epoch_without_a_batch_raises_instead_of_ending_quietly(tmp_path, num_workers):
    one_sample_tar(tmp_path / "a.tar", "jpg")  # no txt: skipped
    loader = keys_module(str(tmp_path / "a.tar"), num_workers=num_workers).train_dataloader()
    with pytest.raises(EmptyEpochError, match=r"epoch 0 .* no batch of 2 .*'.*a\.tar' \(1 shard\).*empty 1"):
        list(loader)


def test_an_epoch_with_a_batch_is_fine_and_a_short_one_is_named(tmp_path):
    one_sample_tar(tmp_path / "a.tar", "txt")  # one usable sample, batch_size 2: training drops the partial batch
    with pytest.raises(EmptyEpochError, match="no batch of 2 usable samples"):
        list(keys_module(str(tmp_path / "a.tar")).train_dataloader())
    assert list(keys_module(str(tmp_path / "a.tar"), batch_size=1).train_dataloader()) == [["000000000"]]


def test_a_folder_is_never_read_as_a_shard(tmp_path):
    (tmp_path / "sub").mkdir()
    one_sample_tar(tmp_path / "sub" / "x-00000.tar", "txt")
    with pytest.raises(ValueError, match=r"folder without \*\.tar shards; its subfolders sub/ hold shards"):
        keys_module(str(tmp_path)).train_dataloader()
