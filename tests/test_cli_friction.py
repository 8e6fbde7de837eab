"""What a new user hits first, through the real ``mmlm`` CLI: every real-size config builds its Trainer on a CPU
machine, GPU-only settings are named before anything is built, ``val_check_interval`` counts steps across epochs,
``--optimizer``/``--lr_scheduler`` are refused, and inconsistent decoding settings are named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

import mmlm.app.lightning
from mmlm.app.cli import main
from mmlm.app.lightning import MMLMCLI, lightning_cli

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("tiny", "strategies"))
TINY_FROZEN = ROOT / "configs" / "tiny" / "frozen.yaml"
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "vocab_size": 64,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.3}
TINY_RESNET = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when ``args=`` and ``sys.argv`` (pytest's here) are both present."""
    monkeypatch.setattr(sys, "argv", ["mmlm"])


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))


class TrainerOnlyCLI(MMLMCLI):
    """The ``mmlm`` parser, defaults and trainer construction, without the model and datamodule (real-size ones
    need the hub) and without the path checks (the configs name data that is not here)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        config = self.config.clone()
        config.model = config.data = None
        self.config_init = self.parser.instantiate_classes(config)
        self.trainer = self.instantiate_trainer()


def build_trainer(monkeypatch, *args: str):
    """The Trainer ``mmlm fit`` would build from ``args`` (``lightning_cli``'s own arguments, trainer only)."""
    monkeypatch.setattr(mmlm.app.lightning, "MMLMCLI", TrainerOnlyCLI)
    return lightning_cli([*args, "--trainer.logger", "false"], run=False).trainer


# ------------------------------------------------------------------------------ 1. devices


def test_there_are_real_size_configs():
    assert len(REAL_CONFIGS) > 20


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_real_size_config_builds_its_trainer_on_a_cpu(path, no_gpu, monkeypatch, tmp_path):
    declared = yaml.safe_load(path.read_text())["trainer"]
    trainer = build_trainer(monkeypatch, "--config", str(path), "--trainer.default_root_dir", str(tmp_path))
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 1
    assert declared["accelerator"] == "auto" and declared["devices"] in ("auto", 1)
    expected = DDPStrategy if "ddp" in declared.get("strategy", "") else SingleDeviceStrategy
    assert isinstance(trainer.strategy, expected)
    assert trainer.precision == declared.get("precision", "32-true")  # bf16-mixed autocasts on CPU too
    if isinstance(declared.get("val_check_interval"), int):
        assert trainer.val_check_interval == declared["val_check_interval"]
        assert trainer.check_val_every_n_epoch is None  # counted over the whole run, not per epoch


def test_ddp_strategy_config_builds_on_a_cpu(no_gpu, monkeypatch, tmp_path):
    trainer = build_trainer(monkeypatch, "--config", str(ROOT / "configs" / "blip2" / "stage2_opt2.7b.yaml"),
                            "--config", str(ROOT / "configs" / "strategies" / "ddp.yaml"),
                            "--trainer.default_root_dir", str(tmp_path))
    assert isinstance(trainer.accelerator, CPUAccelerator) and isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 1 and trainer.strategy._ddp_kwargs["find_unused_parameters"] is False


def test_fp16_mixed_precision_on_a_cpu_becomes_bf16(no_gpu, monkeypatch, tmp_path):
    """Lightning turns ``16-mixed`` into ``bf16-mixed`` on CPU (with a warning) instead of failing."""
    trainer = build_trainer(monkeypatch, "--config", str(ROOT / "configs" / "frozen" / "nfresnet50_opt.yaml"),
                            "--trainer.precision", "16-mixed", "--trainer.default_root_dir", str(tmp_path))
    assert trainer.precision == "bf16-mixed"


def test_gpu_accelerator_without_a_gpu_is_named_before_anything_is_built(no_gpu, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_FROZEN), "--trainer.accelerator", "gpu"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "trainer.accelerator=gpu" in err and "--trainer.accelerator=auto" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 2. validation every N steps


def tiny_frozen_config(tmp_path: Path, shapes_data: Path) -> Path:
    """configs/tiny/frozen.yaml with a randomly initialised tiny GPT-2 in place of the stage-1 export."""
    config = yaml.safe_load(TINY_FROZEN.read_text())
    config["model"]["init_args"]["language_model"]["init_args"] = {"config": TINY_GPT2}
    config["model"]["init_args"]["tokenizer"] = str(shapes_data / "tokenizer")
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def short_epochs_run(tmp_path: Path, shapes_data: Path, steps: int, interval: int) -> list[str]:
    """A tiny Frozen fit with 2 batches per epoch (16 samples, batch 8) validating every ``interval`` steps."""
    vqa = json.dumps([{"urls": str(shapes_data / "{}" / "vqa-*.tar"), "kind": "vqa"}])
    return ["fit", "--config", str(tiny_frozen_config(tmp_path, shapes_data)),
            "--data.init_args.train", vqa.replace("{}", "train"), "--data.init_args.val", vqa.replace("{}", "val"),
            "--data.init_args.batch_size", "8", "--data.init_args.epoch_samples", "16",
            "--data.init_args.num_workers", "0", "--data.init_args.shuffle_buffer", "16",
            "--model.init_args.encoder.init_args.img_size", "32",
            "--model.init_args.encoder.init_args.model_kwargs", json.dumps(TINY_RESNET),
            "--model.init_args.generation.max_new_tokens", "2",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(interval),
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def test_validation_runs_every_n_steps_across_short_epochs(shapes_data, tmp_path):
    assert main(short_epochs_run(tmp_path, shapes_data, steps=6, interval=3)) == 0
    predictions = tmp_path / "run" / "predictions"
    assert sorted(p.name for p in predictions.glob("val-vqa-step*[0-9].json")) == [
        "val-vqa-step3.json", "val-vqa-step6.json"]  # global steps 3 and 6, in epochs 1 and 2 of 2 steps each
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["trainer"]["check_val_every_n_epoch"] is None


def test_an_explicit_per_epoch_count_is_left_to_lightning(shapes_data, tmp_path):
    """mmlm's default yields to the user's explicit setting; Lightning then refuses an interval beyond the epoch."""
    run = short_epochs_run(tmp_path, shapes_data, steps=6, interval=3)
    with pytest.raises(ValueError, match="val_check_interval"):
        main([*run, "--trainer.check_val_every_n_epoch", "1"])


@pytest.mark.parametrize("interval,per_epoch", [("0.5", 1), ("1.0", 1), ("4", None), ("00:00:10:00", None)])
def test_fractional_intervals_keep_counting_per_epoch(interval, per_epoch, monkeypatch, tmp_path):
    trainer = build_trainer(monkeypatch, "--config", str(TINY_FROZEN), "--trainer.val_check_interval", interval,
                            "--trainer.default_root_dir", str(tmp_path))
    assert trainer.check_val_every_n_epoch == per_epoch


# ---------------------------------------------------------------------- 3. --optimizer


@pytest.mark.parametrize("flags,named", [
    (["--optimizer", "SGD", "--optimizer.lr", "0.1"], "--optimizer"),
    (["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "10"], "--lr_scheduler"),
])
def test_optimizer_flags_are_refused_naming_the_model_settings(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_FROZEN), *flags])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert named in err and "warmup + cosine" in err
    for setting in ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "betas"):
        assert f"--model.init_args.{setting}" in err


# -------------------------------------------------------------------------- 4. decoding settings


@pytest.mark.parametrize("flags,named", [
    (["--model.init_args.generation.temperature", "0.7"], "do_sample"),
    (["--model.init_args.generation.do_sample", "true", "--model.init_args.generation.top_p", "1.5"], "top_p"),
])
def test_inconsistent_decoding_settings_are_named_before_anything_is_built(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY_FROZEN), *flags])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "model.init_args.generation" in err and named in err
