"""Frozen-feature caching: ``mmlm data cache-features`` writes shards with ``features.npy``; with
``cached_features: true`` the loss equals the live frozen encoder's for the same batch (Frozen with a frozen
encoder, BLIP-2 stage 2), the encoder never runs, and a trainable encoder is refused."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from datamodules import ImageTextDataModule, Source
from datamodules.image_text import cached_features
from datamodules.pipeline.skips import SkipSample
from mmlm.app.cli import main
from mmlm.app.features import load_model

TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8, "initializer_range": 0.02}


def model_config(family: str, shapes_data, gpt2: dict, resnet: dict) -> dict:
    """A training config's ``model:`` section for a tiny Frozen (frozen encoder) or BLIP-2."""
    lm = {"class_path": "mmlm.language.HFCausalLM", "init_args": {"config": gpt2}}
    if family == "frozen":
        encoder = {"class_path": "mmlm.encoders.TimmEncoder",
                   "init_args": {"name": "resnet10t", "img_size": 32, "model_kwargs": resnet, "freeze": True}}
        extra = {}
    else:
        encoder = {"class_path": "mmlm.encoders.HFVisionEncoder",
                   "init_args": {"model_type": "blip_2_vision_model", "config": TINY_VIT, "freeze": True}}
        extra = {"num_query_tokens": 4, "qformer": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                    "intermediate_size": 64, "dropout": 0.0}}
    init = {"tokenizer": str(shapes_data / "tokenizer"), "encoder": encoder, "language_model": lm,
            "generation": {"max_new_tokens": 2}, **extra}
    return {"seed_everything": 0, "model": {"class_path": f"mmlm.models.{'Frozen' if family == 'frozen' else 'Blip2'}",
                                            "init_args": init}}


def val_loss(model: pl.LightningModule, urls: str, cached: bool) -> float:
    """``val/loss`` of one pass over ``urls`` (VQA) through a real ``Trainer.validate``."""
    data = ImageTextDataModule(val=[Source(urls, kind="vqa")], batch_size=8, cached_features=cached)
    with tempfile.TemporaryDirectory() as root:  # evaluation writes predictions under the trainer's root
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=root)
        return float(trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"])


@pytest.fixture(params=["frozen", "blip2"])
def cached(request, shapes_data, tmp_path, tiny_gpt2, tiny_resnet, capsys):
    """(family, config path, input pattern, output dir, printed summary) after running the tool on val VQA."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(model_config(request.param, shapes_data, tiny_gpt2, tiny_resnet)))
    urls, out = str(shapes_data / "val" / "vqa-*.tar"), tmp_path / "cached"
    assert main(["data", "cache-features", urls, "--config", str(config), "--out", str(out), "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    return request.param, config, urls, out, json.loads(printed[printed.index("{"):])


def test_cached_shards_keep_every_member_and_key_and_add_features(cached, shapes_data):
    family, _, urls, out, summary = cached
    originals = sorted((shapes_data / "val").glob("vqa-*.tar"))
    keys = 0
    assert summary["shards"] == len(originals) and summary["skipped"] == {}
    assert (out / "summary.json").is_file() and summary["dtype"] == "float32"
    for original in originals:
        with tarfile.open(original) as before, tarfile.open(out / original.name) as after:
            names_before = before.getnames()
            names_after = after.getnames()
            assert [n for n in names_after if not n.endswith(".features.npy")] == names_before
            assert len(names_after) - len(names_before) == len({n.split(".")[0] for n in names_before})
            keys += len(names_after) - len(names_before)
            member = next(n for n in names_after if n.endswith(".features.npy"))
            features = np.load(io.BytesIO(after.extractfile(member).read()))
            assert list(features.shape) == summary["shape"] and features.dtype == np.float32
    assert summary["samples"] == keys > 0


def test_loss_on_cached_features_equals_the_live_frozen_encoder(cached, monkeypatch):
    family, config, urls, out, _ = cached
    model = load_model(config)
    live = val_loss(model, urls, cached=False)
    calls = []
    forward = type(model.encoder).forward
    monkeypatch.setattr(type(model.encoder), "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    from_cache = val_loss(model, str(out / "*.tar"), cached=True)
    assert calls == []  # the encoder never ran
    assert from_cache == pytest.approx(live, rel=1e-5)
    assert "forward" not in vars(model.encoder)  # the live encoder is back after each batch


def test_training_from_cached_features_runs_without_the_encoder(cached, monkeypatch):
    family, config, _, out, _ = cached
    model = load_model(config)
    monkeypatch.setattr(type(model.encoder), "forward", lambda self, x: pytest.fail("the encoder ran"))
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    data = ImageTextDataModule(train=[Source(str(out / "*.tar"), kind="vqa")], batch_size=4, cached_features=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_a_trainable_encoder_is_refused_by_the_tool_and_the_model(shapes_data, tmp_path, tiny_gpt2, tiny_resnet,
                                                                   shapes_batch):
    section = model_config("frozen", shapes_data, tiny_gpt2, tiny_resnet)
    section["model"]["init_args"]["encoder"]["init_args"]["freeze"] = False
    config = tmp_path / "trainable.yaml"
    config.write_text(yaml.safe_dump(section))
    with pytest.raises(ValueError, match="encoder is trainable"):
        main(["data", "cache-features", str(shapes_data / "val" / "vqa-*.tar"), "--config", str(config),
              "--out", str(tmp_path / "out")])
    model = load_model(config)
    batch = shapes_batch(size=2)
    batch.features = torch.zeros(2, model.encoder.num_tokens, model.encoder.width)
    with pytest.raises(ValueError, match="encoder is trainable"):
        model.on_train_batch_start(batch, 0)


def test_features_of_another_encoder_are_named(cached, shapes_batch):
    _, config, _, _, _ = cached
    model = load_model(config)
    batch = shapes_batch(size=2)
    batch.features = torch.zeros(2, 3, model.encoder.width + 1)
    with pytest.raises(ValueError, match=r"cached features have shape \(2, 3, \d+\)"):
        model.on_validation_batch_start(batch, 0)


def test_samples_without_features_are_skipped_with_a_reason():
    with pytest.raises(SkipSample) as info:
        cached_features({"__key__": "a", "jpg": b"x"})
    assert info.value.reason == "missing_features"
    with pytest.raises(SkipSample) as info:
        cached_features({"__key__": "a", "features.npy": b"not npy"})
    assert info.value.reason == "bad_features"
