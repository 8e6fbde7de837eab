"""The life of a checkpoint through the real CLI, for every family's tiny config: ``mmlm fit`` → ``validate``,
``test`` and ``predict`` by ``--ckpt_path`` → resume with ``fit --ckpt_path`` → ``Family.load_from_checkpoint``.

Checkpoints must load with ``torch.load(weights_only=True)`` (what LightningCLI uses for ``--ckpt_path``) and their
``hparams.yaml`` / ``config.yaml`` with ``yaml.safe_load``. The configs run as written, from a workspace holding the
``data/`` and ``runs/`` paths they name (small synthetic data sets), with a few steps and small batches.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import write_workspace

from mmlm.app.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1",
         "--trainer.enable_progress_bar", "false", "--data.init_args.num_workers", "0"]


def shards(pattern: str, kind: str) -> str:
    return json.dumps([{"urls": pattern, "kind": kind}])


#: config → (family class name, extra fit arguments, test-data arguments, predict-data arguments or None)
CASES = {
    "text_lm": ("CausalLMPretraining", [], ["--data.init_args.test", shards("data/shapes/val/vqa-*.tar", "vqa")],
                ["--data.init_args.predict", shards("data/shapes/val/vqa-*.tar", "vqa")]),
    "frozen": ("Frozen", [], ["--data.init_args.test", shards("data/shapes/val/vqa-*.tar", "vqa")],
               ["--data.init_args.predict", shards("data/shapes/val/captions-*.tar", "caption")]),
    "blip2_stage1": ("Blip2Stage1", [], ["--data.init_args.test", shards("data/shapes/val/captions-*.tar", "caption")],
                     None),
    "blip2_stage2": ("Blip2", [], ["--data.init_args.test", shards("data/shapes/val/vqa-*.tar", "vqa")],
                     ["--data.init_args.predict", shards("data/shapes/val/vqa-*.tar", "vqa")]),
    "blip2_vqa_instruct": ("Blip2", [], ["--data.init_args.test", shards("data/shapes/val/vqa-*.tar", "vqa")],
                           ["--data.init_args.predict", shards("data/shapes/val/vqa-*.tar", "vqa")]),
    "kosmos1": ("Kosmos1", [], ["--data.init_args.test", shards("data/interleaved/val/vqa-*.tar", "vqa")],
                ["--data.init_args.predict", shards("data/interleaved/val/vqa-*.tar", "vqa")]),
    "palme": ("PaLME", [], ["--data.init_args.test_urls", "data/tabletop/val/tabletop-*.tar"],
              ["--data.init_args.predict_urls", "data/tabletop/val/tabletop-*.tar"]),
    "metalm_vqa": ("MetaLM", [], ["--data.init_args.test_urls", "data/shapes/val/vqa-*.tar"],
                   ["--data.init_args.predict", shards("data/shapes/val/vqa-*.tar", "vqa")]),
    "metalm_pretrain": ("MetaLMPretraining", [], ["--data.init_args.test_urls", "data/shapes/val/captions-*.tar"],
                        None),
    "vlmo_stage1": ("VLMOStage1", [], ["--data.init_args.test_urls", "data/shapes/val/captions-*.tar"], None),
    "vlmo_stage3": ("VLMOStage3", [], ["--data.init_args.test", shards("data/shapes/val/captions-*.tar", "caption")],
                    None),
    "vlmo_vqa": ("VLMOVQA", [], ["--data.init_args.test_urls", "data/shapes/val/vqa-*.tar"],
                 ["--data.init_args.predict", shards("data/shapes/val/vqa-*.tar", "vqa")]),
    "vlmo_nlvr2": ("VLMONLVR2", [], ["--data.init_args.test_urls", "data/shapes_pairs/val/pairs-*.tar"], None),
    "donut_read": ("Donut", [], ["--data.init_args.test_path", "data/donut/docs/shards/validation"],
                   ["--data.init_args.predict_path", "data/donut/docs/shards/validation"]),
    "donut_cord": ("Donut", [], ["--data.init_args.test_path", "data/donut/receipts/shards/validation"],
                   ["--data.init_args.predict_path", "data/donut/receipts/shards/validation"]),
}
#: configs whose fit writes what a later config reads (text_lm → the LM export, donut_read → the Donut export)
ORDER = list(CASES)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Small synthetic data sets at the ``data/…`` paths the tiny configs name (shared with test_ddp_contract.py)."""
    return write_workspace(tmp_path_factory.mktemp("workspace"))


def family_class(config: str) -> type:
    """The LightningModule class a config builds (``Donut.from_hf`` → ``Donut``)."""
    module, _, name = yaml.safe_load(Path(config).read_text())["model"]["class_path"].rpartition(".")
    if name[0].islower():  # a builder classmethod
        module, _, name = module.rpartition(".")
    return getattr(importlib.import_module(module), name)


def run(*args: str) -> None:
    assert main(list(args)) == 0, args


def newest_checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert found, f"no checkpoint under {root}"
    return found[-1]


@pytest.fixture(autouse=True)
def cli_context(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "argv", ["mmlm"])


@pytest.mark.parametrize("name", ORDER)
def test_fit_then_validate_test_predict_resume_and_load(name):
    family, extra, test_data, predict_data = CASES[name]
    config = str(CONFIGS / "tiny" / f"{name}.yaml")
    batch = ["--data.init_args.batch_size", "2" if name.startswith("donut") else "4"]
    run("fit", "--config", config, *QUICK, *batch, *extra)
    root = Path(yaml.safe_load(Path(config).read_text())["trainer"]["default_root_dir"])
    checkpoint = newest_checkpoint(root)

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # what LightningCLI does for --ckpt_path
    assert state["global_step"] == 2
    run_dir = checkpoint.parents[1]
    for saved in (run_dir / "hparams.yaml", run_dir / "config.yaml"):
        if saved.is_file():
            assert isinstance(yaml.safe_load(saved.read_text()), dict), saved  # no !!python tags

    run("validate", "--config", config, *QUICK, *batch, "--ckpt_path", str(checkpoint))
    run("test", "--config", config, *QUICK, *batch, *test_data, "--ckpt_path", str(checkpoint))
    if predict_data is not None:
        predictions = root / "predict"
        run("predict", "--config", config, *QUICK, *batch, *predict_data, "--ckpt_path", str(checkpoint),
            "--model.init_args.predictions_dir", str(predictions))
        assert list((predictions / "predictions").glob("predict-*")), "predict wrote no result file"

    run("fit", "--config", config, *QUICK, *batch, *extra, "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint))
    resumed = torch.load(newest_checkpoint(root), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4

    model = family_class(config).load_from_checkpoint(str(checkpoint))
    assert type(model).__name__ == family
    weights = model.state_dict()
    for key, value in state["state_dict"].items():
        assert torch.equal(weights[key], value), key

    exported = root / "exported"  # Hugging Face files for BLIP-2 and Donut, a self-contained directory for the rest
    run("export", "--ckpt_path", str(checkpoint), "--out", str(exported))
    info = json.loads((exported / "mmlm_export.json").read_text())
    assert info["source"]["global_step"] == 2 and info["training_config"] and info["mmlm_version"]
    reloaded = family_class(config).from_pretrained(exported)
    # BLIP-2 reads the ViT before its post_layernorm (the Q-Former's vision_norm, exported as post_layernorm), so the
    # ViT's own post_layernorm is an unused frozen weight that the round trip replaces by vision_norm's values:
    unused = {k for k in weights if k.startswith("encoder.model.post_layernorm.")} if family == "Blip2" else set()
    assert not unused or torch.equal(reloaded.state_dict()["encoder.model.post_layernorm.weight"],
                                     weights["qformer.vision_norm.weight"])
    for key, value in weights.items():
        if key not in unused:
            assert torch.equal(reloaded.state_dict()[key].to(value.dtype), value), key
    if predict_data is not None and info["format"] == "mmlm":  # the export predicts what the checkpoint predicts
        run("predict", "--config", config, *QUICK, *batch, *predict_data, "--model", str(exported),
            "--model.init_args.predictions_dir", str(root / "predict_export"))
        assert predictions_of(root / "predict_export") == predictions_of(root / "predict")


def predictions_of(directory: Path) -> dict[str, object]:
    """``file name → content`` of a predict run's result files (step numbers and settings left out)."""
    files = sorted(p for p in (directory / "predictions").rglob("predict-*") if p.is_file()
                   and not p.name.endswith(".generation.json"))
    assert files, directory
    return {re.sub(r"step\d+", "step", str(p.relative_to(directory))): p.read_text() for p in files}
