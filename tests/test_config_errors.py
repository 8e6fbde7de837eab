"""Config errors stop ``mmlm fit`` before any model, datamodule or trainer is built, naming the key or path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import resume_probe

from datamodules.synthetic.hostile import write_hostile
from mmlm.cli import main


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
