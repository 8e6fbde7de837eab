"""Config errors stop ``mmlm fit`` before any model, datamodule or trainer is built, naming the key or path: unknown
keys, wrong types, missing shards and checkpoints, a wrong source kind, an empty tokenizer folder, ``max_epochs``
without a known run length, a folder as ``urls``; ``make-shards`` given a folder; mixed sources whose keys collide
are told apart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import resume_probe
import webdataset as wds

from datamodules.config_checks import source_problem
from datamodules.synthetic.hostile import write_hostile
from mmlm.app.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cfg")
    write_hostile(out, captions=20, vqa=20, period=1000)
    return out


@pytest.fixture(autouse=True)
def no_construction(monkeypatch):
    """Building the model would fail the test: every error must come first."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was constructed before the config error was reported")

    monkeypatch.setattr(resume_probe.KeyModel, "__init__", refuse)


def fit_error(args: list[str], capsys) -> str:
    """Run ``mmlm fit`` expecting the parser's exit code 2; returns stderr."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule",
              "--trainer.accelerator=cpu", *args])
    assert info.value.code == 2
    return capsys.readouterr().err


def sources(urls: str, **extra) -> str:
    return f"--data.init_args.train={json.dumps([{'urls': urls, **extra}])}"


def test_unknown_key_is_named(data, capsys):
    err = fit_error([sources(f"{data}/captions-*.tar"), "--data.init_args.batch_sise=3"], capsys)
    assert "batch_sise" in err and "not accepted" in err


def test_unknown_key_inside_a_source_is_named(data, capsys):
    err = fit_error([sources(f"{data}/captions-*.tar", knd="vqa")], capsys)
    assert "knd" in err


def test_wrong_type_is_named_with_its_value(data, capsys):
    err = fit_error([sources(f"{data}/captions-*.tar"), "--data.init_args.epoch_samples=many"], capsys)
    assert 'Parser key "epoch_samples"' in err and "many" in err


def test_missing_shards_are_named_with_their_key(data, capsys):
    err = fit_error([sources(f"{data}/captions-{{00000..00003}}.tar")], capsys)
    assert "data.init_args.train[0].urls" in err and "captions-00002.tar" in err and "3 of 4 shards" in err
    err = fit_error([sources(str(data / "nowhere-*.tar"))], capsys)
    assert "no shard matches" in err and "nowhere-*.tar" in err


def test_missing_shards_of_url_arguments_are_named(data, capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", "--model=resume_probe.KeyModel", "--data=datamodules.VQADataModule",
              f"--data.init_args.val_urls={data}/val-*.tar"])
    assert info.value.code == 2
    assert "data.init_args.val_urls" in capsys.readouterr().err


def test_missing_checkpoint_is_named(data, tmp_path, capsys):
    missing = tmp_path / "runs" / "last.ckpt"
    err = fit_error([sources(f"{data}/captions-*.tar"), f"--ckpt_path={missing}"], capsys)
    assert f"ckpt_path={str(missing)!r}: no such checkpoint file" in err


# -- errors found by the sources' own classes, tokenizer folders, run length (one line each) --------------------


def error_line(data: Path, args: list[str], capsys, datamodule: str = "datamodules.ImageTextDataModule") -> str:
    """Run ``mmlm fit`` with the data's tokenizer expecting the parser's exit code 2 and no traceback; returns the
    error line."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--model=resume_probe.KeyModel", f"--data={datamodule}", "--trainer.accelerator=cpu",
              f"--data.init_args.tokenizer={data / 'tokenizer'}", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if line.startswith("error:"))


def train(urls: str, **extra) -> str:
    return f"--data.init_args.train={json.dumps([{'urls': urls, **extra}])}"


def test_a_wrong_source_kind_is_named_with_its_key(data, capsys):
    err = error_line(data, [train(f"{data}/captions-*.tar", kind="captions"), "--trainer.max_steps=2"], capsys)
    assert err.startswith("error: data.init_args.train[0]: Source kind 'captions' is not one of")


def test_a_wrong_mix_source_kind_is_named_for_the_interleaved_datamodule(data, capsys):
    err = error_line(data, [train(f"{data}/captions-*.tar", kind="pairs"), "--trainer.max_steps=2"], capsys,
                    datamodule="datamodules.InterleavedDataModule")
    assert "data.init_args.train[0]: MixSource kind 'pairs'" in err


def test_source_problem_ignores_what_it_cannot_check():
    assert source_problem({"class_path": "no.such.Module", "init_args": {"train": [{"kind": "x"}]}}) is None
    assert source_problem({"class_path": "datamodules.ImageTextDataModule",
                           "init_args": {"train": [{"urls": "x.tar", "kind": "vqa"}]}}) is None


def test_an_empty_tokenizer_folder_is_named(data, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    err = error_line(data, [train(f"{data}/captions-*.tar"), "--trainer.max_steps=2",
                           f"--data.init_args.tokenizer={tmp_path / 'tok'}"], capsys)
    assert f"data.init_args.tokenizer={str(tmp_path / 'tok')!r} is an empty folder" in err
    err = error_line(data, [train(f"{data}/captions-*.tar"), "--trainer.max_steps=2",
                           f"--data.init_args.tokenizer={tmp_path / 'nowhere' / 'tok'}"], capsys)
    assert "no such tokenizer folder" in err


def test_max_epochs_without_a_known_length_is_named(data, capsys):
    err = error_line(data, [train(f"{data}/captions-*.tar"), "--trainer.max_epochs=2"], capsys)
    assert "trainer.max_epochs=2 without trainer.max_steps" in err and "epoch_samples" in err


def test_max_epochs_with_epoch_samples_or_limit_is_accepted(data, capsys):
    """The checks pass, so the (refusing) model is built: the AssertionError proves no config error came first."""
    for extra in (["--data.init_args.epoch_samples=8"], ["--trainer.limit_train_batches=3"]):
        with pytest.raises((AssertionError, ValueError), match="constructed before"):
            main(["fit", "--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule",
                  "--trainer.accelerator=cpu", f"--data.init_args.tokenizer={data / 'tokenizer'}",
                  train(f"{data}/captions-*.tar"), "--trainer.max_epochs=2", *extra])


def test_a_folder_as_urls_is_named_with_the_patterns_inside(data, capsys):
    err = error_line(data, [train(str(data)), "--trainer.max_steps=2"], capsys)
    assert "data.init_args.train[0].urls=" in err and "is a folder, not a shard" in err
    assert repr(f"{data}/captions-*.tar") in err and repr(f"{data}/vqa-*.tar") in err


def test_make_shards_given_a_folder_is_one_line(tmp_path, capsys):
    assert main(["data", "make-shards", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mmlm data make-shards: error: input {str(tmp_path)!r} is a folder")
    assert not (tmp_path / "out").exists()


# -- keys of mixed sources -------------------------------------------------------------------------------------------


def test_colliding_keys_of_mixed_sources_are_prefixed_by_their_source(tmp_path, caplog):
    from datamodules.pipeline.shard_pipeline import ShardPipeline
    from datamodules.pipeline.skips import SkipSample

    for name in ("laion", "coco"):
        (tmp_path / name).mkdir()
        with wds.TarWriter(str(tmp_path / name / "00000.tar")) as writer:
            for i in range(3):
                writer.write({"__key__": f"{i:09d}", "txt": b"x"} if i else {"__key__": f"{i:09d}", "bad": b"x"})

    def keys(sample: dict, source: int) -> str:
        if "bad" in sample:
            raise SkipSample("bad_sample")
        return sample["__key__"]

    mixed = ShardPipeline([str(tmp_path / "laion" / "00000.tar"), str(tmp_path / "coco" / "00000.tar")], [1, 1],
                          keys, list, batch_size=1, train=False, resampled=False, shuffle_buffer=0, seed=0,
                          epoch_samples=None, rank=0, world_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="datamodules.pipeline.skips"):
        seen = [key for item in mixed.iter_worker(0, 1) if item.batch for key in item.batch]
    assert set(seen) <= {"laion/00000/000000001", "laion/00000/000000002", "coco/00000/000000001",
                         "coco/00000/000000002"}
    assert len(seen) == len(set(seen)) >= 2  # distinct although both shards use keys 000000001, 000000002
    assert "laion/00000/000000000" in caplog.text or "coco/00000/000000000" in caplog.text  # the skip names it
    single = ShardPipeline([str(tmp_path / "coco" / "00000.tar")], [1], keys, list, batch_size=1, train=False,
                           resampled=False, shuffle_buffer=0, seed=0, epoch_samples=None, rank=0, world_size=1,
                           num_workers=0)
    assert [k for item in single.iter_worker(0, 1) if item.batch for k in item.batch] == ["000000001", "000000002"]
