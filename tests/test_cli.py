"""The ``mmlm`` command: every config parses, bad keys are named, data tools run, and a short fit works."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmlm.app.cli import main


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when ``args=`` and ``sys.argv`` (pytest's here) are both present."""
    monkeypatch.setattr(sys, "argv", ["mmlm"])


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "no YAML under configs/"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_parses_through_the_cli(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(path.read_text())
    for part in ("model", "data"):
        if part in declared:
            assert printed[part]["class_path"] == class_path(declared[part]), part


def class_path(value: str | dict) -> str:
    """``class_path`` of a config entry written either way (``model: pkg.Cls`` or ``model: {class_path: …}``)."""
    return value if isinstance(value, str) else value["class_path"]


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS[0]).read_text())
    config["model"]["init_args"]["no_such_option"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "no_such_option" in capsys.readouterr().err


def test_unknown_command_line_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS[0]), "--model.init_args.lrr", "0.1", "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "lrr" in capsys.readouterr().err


def test_unknown_command_is_refused(capsys):
    assert main(["fitt"]) == 2
    assert "fitt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- data tools


def test_data_synth_shapes_prints_its_summary(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "synth-shapes", "--out", str(out), "--train", "4", "--val", "2", "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["images"] == {"train": 4, "val": 2}
    assert summary["splits"]["train"]["shards"]["captions"] == 2
    assert sorted(p.name for p in (out / "train").glob("captions-*.tar")) == ["captions-00000.tar", "captions-00001.tar"]
    assert (out / "tokenizer").is_dir() and (out / "summary.json").is_file()


def test_data_make_shards_then_inspect(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 16), colour).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {colour} picture"})
    rows.append({"image": "missing.png", "caption": "not there"})
    captions = images / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "shards"

    assert main(["data", "make-shards", str(captions), "--out", str(out), "--format", "folder-jsonl",
                 "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["samples"] == 3 and summary["shards"] == 2
    assert sum(summary["skipped"].values()) == 1
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]

    assert main(["data", "inspect", summary["urls"], "-n", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3 samples in 2 shards" in printed and "a red picture" in printed


# ------------------------------------------------------------------------------------------ fit


def data_overrides(shapes_data: Path, batch_size: int = 8) -> list[str]:
    """Point a tiny config's data at the test shards, in small batches, without workers."""
    def sources(split: str) -> str:
        return json.dumps([{"urls": str(shapes_data / split / "vqa-*.tar"), "kind": "vqa"},
                           {"urls": str(shapes_data / split / "captions-*.tar"), "kind": "caption"}])

    return ["--data.init_args.train", sources("train"), "--data.init_args.val", sources("val"),
            "--data.init_args.batch_size", str(batch_size), "--data.init_args.num_workers", "0",
            "--data.init_args.shuffle_buffer", "16",
            "--model.init_args.tokenizer", str(shapes_data / "tokenizer")]


def short_run(config: str, root: Path, steps: int = 3) -> list[str]:
    return ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / config),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.init_args.generation.max_new_tokens", "3"]


def test_fit_text_lm_then_frozen_and_rerun_into_the_same_directory(shapes_data, tmp_path, tiny_gpt2, tiny_resnet):
    export = tmp_path / "text_lm" / "export"
    assert main([*short_run("text_lm.yaml", tmp_path / "text_lm"), *data_overrides(shapes_data),
                 "--model.init_args.language_model.init_args.config", json.dumps(tiny_gpt2),
                 "--model.init_args.export_dir", str(export)]) == 0
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()

    root = tmp_path / "frozen"
    frozen = [*short_run("frozen.yaml", root), *data_overrides(shapes_data),
              "--model.init_args.language_model.init_args.name_or_path", str(export),
              "--model.init_args.encoder.init_args.img_size", "32",
              "--model.init_args.encoder.init_args.model_kwargs", json.dumps(tiny_resnet)]
    assert main(frozen) == 0
    assert (root / "config.yaml").is_file()
    assert [p.name for p in (root / "checkpoints").glob("*.ckpt")] == ["epoch=0-step=3.ckpt"]
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "mmlm.models.Frozen"
    assert saved["model"]["init_args"]["language_model"]["init_args"]["name_or_path"] == str(export)
    assert saved["trainer"]["max_steps"] == 3
    assert (root / "predictions" / "val-vqa-step3.json").is_file()

    checkpoint = root / "checkpoints" / "epoch=0-step=3.ckpt"
    validate = ["validate", *frozen[1:], "--ckpt_path", str(checkpoint)]
    assert main(validate) == 0  # the checkpoint (with its GenerationConfig hyperparameter) loads weights-only
    # Without a model config the model is the one the checkpoint records: the same predictions.
    val = data_overrides(shapes_data)[2:4]
    bare = ["validate", "--ckpt_path", str(checkpoint), "--data", "datamodules.ImageTextDataModule", *val,
            "--data.init_args.tokenizer", str(shapes_data / "tokenizer"), "--data.init_args.batch_size", "8",
            "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "bare")]
    assert main(bare) == 0
    predictions = sorted((root / "predictions").glob("val-vqa-step3*.json"))
    bare_predictions = sorted((tmp_path / "bare" / "predictions").glob("val-vqa-step3*.json"))
    assert bare_predictions and json.loads(bare_predictions[-1].read_text()) == json.loads(predictions[-1].read_text())

    assert main([*frozen, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]) == 0  # same directory
    assert yaml.safe_load((root / "config.yaml").read_text())["trainer"]["max_steps"] == 2


def test_bare_command_lists_every_command(capsys):
    from mmlm.app.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("fit", "validate", "test", "predict", "data", "quickstart"))


def test_ckpt_path_last_finds_the_newest_checkpoint_of_an_earlier_run(shapes_data, tmp_path, tiny_gpt2, capsys):
    """Without a fixed ModelCheckpoint dirpath each run logs into a new version folder; `--ckpt_path last` still
    resumes from the newest checkpoint under default_root_dir instead of silently starting from scratch."""
    root = tmp_path / "text_lm"
    run = [*short_run("text_lm.yaml", root), *data_overrides(shapes_data), "--trainer.logger", "true",
           "--model.init_args.language_model.init_args.config", json.dumps(tiny_gpt2)]
    assert main(run) == 0
    first = sorted(root.rglob("*.ckpt"))
    assert [p.relative_to(root).as_posix() for p in first] == ["lightning_logs/version_0/checkpoints/epoch=0-step=3.ckpt"]
    capsys.readouterr()
    assert main([*run, "--ckpt_path", "last"]) == 0  # resumed at step 3 of 3: nothing left to train
    assert f"--ckpt_path last → {first[0]}" in capsys.readouterr().err
    assert sorted(root.rglob("*.ckpt")) == first  # a fresh run would have written version_1/…/step=3.ckpt


INT_LIMIT_PROBE = """
import sys
if sys.argv[1] == "mmlm-first":
    import mmlm.app.lightning  # the console script's import order: Lightning before anything that imports rich
from rich.console import Console
from jsonargparse import ArgumentParser
from pytorch_lightning import Trainer
parser = ArgumentParser()
parser.add_class_arguments(Trainer, "trainer")
print(type(parser.parse_args(["--trainer.limit_val_batches", "1"]).trainer.limit_val_batches).__name__)
"""


def test_an_int_limit_stays_an_int_in_the_mmlm_command():
    """Importing rich before Lightning makes jsonargparse resolve Lightning's ``Optional[Union[int, float]]`` float
    first, so ``--trainer.limit_val_batches 1`` became 1.0 (= every batch). ``mmlm.app.lightning`` imports Lightning first;
    tests/conftest.py does the same for the test session."""
    import subprocess

    def probe(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", INT_LIMIT_PROBE, mode], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert probe("mmlm-first") == "int"
    assert probe("rich-first") in ("float", "int")  # "float" with the installed versions: the hazard guarded against


def test_fit_help_lists_every_family_and_datamodule(capsys):
    import inspect

    import pytorch_lightning as pl

    import datamodules
    import mmlm.models

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    shown = capsys.readouterr().out
    families = [name for name in mmlm.models.__all__ if inspect.isclass(value := getattr(mmlm.models, name))
                and issubclass(value, mmlm.models.MultimodalModule) and not inspect.isabstract(value)]
    modules = [name for name in datamodules.__all__ if inspect.isclass(value := getattr(datamodules, name))
               and issubclass(value, pl.LightningDataModule)]
    assert "VLMOStage1" in families and "DocumentDataModule" in modules
    assert [name for name in families + modules if name not in shown] == []


def test_every_data_tool_registers_one_way_and_synthetic_tools_share_their_arguments():
    from mmlm.app.data import data_parser

    sub = next(action for action in data_parser()._actions if action.dest == "tool")
    assert len(sub.choices) >= 17
    no_run = [name for name, tool in sub.choices.items() if not callable(tool.get_default("run"))]
    assert no_run == []
    for name, tool in sub.choices.items():
        if name.startswith("synth-"):
            flags = {flag for action in tool._actions for flag in action.option_strings}
            assert {"--out", "--val", "--seed", "--shard-size", "--overwrite"} <= flags, name


@pytest.mark.parametrize("config, key, good", [("blip2_stage2.yaml", "qformer", ("num_layers", 3)),
                                               ("vlmo_stage1.yaml", "transformer", ("depth", 5))])
def test_sub_part_sizes_are_typed_and_checked_key_by_key(capsys, config, key, good):
    """The Q-Former and the MoME transformer are dataclass configs (QFormerConfig, MoMEConfig): a known key
    reaches the model's config, a typo stops the command naming it."""
    import yaml

    path = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / config)
    name, value = good
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", path, f"--model.init_args.{key}.{name}={value}", "--print_config"])
    assert done.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"][key][name] == value
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", path, f"--model.init_args.{key}.{name}x={value}", "--print_config"])
    assert done.value.code != 0 and f"{name}x" in capsys.readouterr().err
