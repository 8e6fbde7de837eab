"""configs/strategies: each parses through the real CLI composed after a model config (the later file wins), and
the DDP / FSDP ones build a Trainer on CPU with the settings the files promise. DeepSpeed is not installed here:
its configs only parse, and building one names the missing package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from mmlm.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))
MODEL = ROOT / "configs" / "blip2" / "stage2_opt2.7b.yaml"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mmlm"])


def trainer_arguments(path: Path, devices: int = 2) -> dict:
    """The ``trainer:`` section of ``path`` parsed and its strategy built as the CLI does, on CPU."""
    section = yaml.safe_load(path.read_text())["trainer"] | {"accelerator": "cpu", "devices": devices}
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(Trainer, "trainer")
    return vars(parser.instantiate_classes(parser.parse_object({"trainer": section})).trainer) | {"logger": False}


def cpu_trainer(path: Path, devices: int = 2) -> Trainer:
    """A Trainer from ``path``'s ``trainer:`` section on ``devices`` CPU processes (built, not launched)."""
    return Trainer(**trainer_arguments(path, devices))


def test_the_promised_strategies_exist():
    assert {p.stem for p in STRATEGIES} >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.stem)
def test_strategy_composes_after_a_model_config(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(MODEL), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(path.read_text())["trainer"]
    assert printed["model"]["class_path"] == "mmlm.models.Blip2"  # the model config is kept
    assert printed["trainer"]["strategy"]["class_path"] == declared["strategy"]["class_path"]
    for key, value in declared["strategy"]["init_args"].items():
        got = printed["trainer"]["strategy"]["init_args"][key]
        assert (sorted(got) == sorted(value)) if isinstance(value, list) else str(got) == str(value), key
    assert printed["trainer"]["max_steps"] == yaml.safe_load(MODEL.read_text())["trainer"]["max_steps"]


def test_ddp_config_builds_a_trainer_without_unused_parameter_search():
    trainer = cpu_trainer(ROOT / "configs" / "strategies" / "ddp.yaml")
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is False
    assert trainer.strategy._ddp_kwargs["static_graph"] is False
    assert trainer.strategy.num_processes == 2


def test_plain_ddp_of_the_model_configs_does_not_search_unused_parameters():
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is False


def test_fsdp_config_wraps_and_checkpoints_transformer_blocks_in_bf16():  # Lightning's FSDP Trainer needs a GPU
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    from mmlm.connectors.qformer import QFormerLayer

    arguments = trainer_arguments(ROOT / "configs" / "strategies" / "fsdp.yaml")
    strategy = arguments["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and {OPTDecoderLayer, QFormerLayer} <= set(policy._module_classes)
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointed, ModuleWrapPolicy) and {OPTDecoderLayer, QFormerLayer} <= set(checkpointed._module_classes)
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trained parameters may share a unit
    assert strategy.sharding_strategy.name == "FULL_SHARD" and arguments["precision"] == "bf16-mixed"


@pytest.mark.parametrize("stem", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_gpu_only_strategy_without_a_gpu_is_named_before_anything_is_built(stem, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(MODEL), "--config", str(ROOT / "configs" / "strategies" / f"{stem}.yaml")])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert f"trainer.strategy=pytorch_lightning.strategies.{'FSDP' if stem == 'fsdp' else 'DeepSpeed'}Strategy" in err
    assert "GPUs only" in err and "Traceback" not in err


@pytest.mark.parametrize("stem", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_configs_name_the_missing_package(stem):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="(?i)deepspeed"):
            cpu_trainer(ROOT / "configs" / "strategies" / f"{stem}.yaml", devices=1)
    else:  # installed: the stage reaches the strategy
        trainer = cpu_trainer(ROOT / "configs" / "strategies" / f"{stem}.yaml", devices=1)
        assert trainer.strategy.config["zero_optimization"]["stage"] == int(stem[-1])
