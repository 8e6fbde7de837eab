"""FSDP2 (``configs/strategies/fsdp2.yaml``: Lightning's ``ModelParallelStrategy``, ``fully_shard`` applied by
``MultimodalModule.configure_model`` through :mod:`mmlm.sharding`) on 2 CPU ranks over gloo, through the real CLI:
fit, a full checkpoint file that loads with ``weights_only=True``, resume; each against the same run under DDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_ddp import ENCODER_KWARGS, REPO, TINY_GPT2, run_cli

from datamodules.synthetic.shapes import write_shapes

WORLD = 2


def fit_args(data: Path, root: Path, strategy: str, steps: int, *extra: str) -> list[str]:
    """``mmlm fit`` of ``configs/tiny/frozen.yaml`` (config-dict GPT-2, narrow ResNet) on 2 CPU ranks under
    ``strategy`` (``"fsdp2"``: the strategy config; ``"ddp"``)."""
    lm = {"class_path": "mmlm.language.HFCausalLM", "init_args": {"name_or_path": None, "config": TINY_GPT2}}
    chosen = (["--config", str(REPO / "configs/strategies/fsdp2.yaml")] if strategy == "fsdp2"
              else ["--trainer.strategy=ddp"])
    return [sys.executable, "-m", "mmlm.app.cli", "fit", "--config", str(REPO / "configs/tiny/frozen.yaml"), *chosen,
            "--trainer.accelerator=cpu", f"--trainer.devices={WORLD}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
            f"--model.init_args.tokenizer={data / 'tokenizer'}", "--model.init_args.encoder.init_args.img_size=32",
            f"--model.init_args.encoder.init_args.model_kwargs={json.dumps(ENCODER_KWARGS)}",
            f"--model.init_args.language_model={json.dumps(lm)}", "--model.init_args.generation.max_new_tokens=2",
            f"--data.init_args.train={json.dumps([{'urls': f'{data}/train/vqa-*.tar', 'kind': 'vqa'}])}",
            f"--data.init_args.val={json.dumps([{'urls': f'{data}/val/vqa-*.tar', 'kind': 'vqa'}])}",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", *extra]


def checkpoint(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_*/checkpoints/*.ckpt")  # one file, not a sharded directory
    return torch.load(path, map_location="cpu", weights_only=True) | {"path": path}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """2 steps under FSDP2 and under DDP, then each resumed from its own checkpoint to step 4."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    data = tmp / "data"
    write_shapes(data, train=64, val=16, seed=0, shard_size=8, progress=False)
    out = {}
    for strategy in ("fsdp2", "ddp"):
        run_cli(fit_args(data, tmp / strategy, strategy, 2))
        out[strategy] = checkpoint(tmp / strategy)
        run_cli(fit_args(data, tmp / f"{strategy}-resumed", strategy, 4, f"--ckpt_path={out[strategy]['path']}"))
        out[f"{strategy}-resumed"] = checkpoint(tmp / f"{strategy}-resumed")
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert isinstance(value, torch.Tensor) and type(value) is torch.Tensor, key  # gathered, not a DTensor shard
        torch.testing.assert_close(value, b["state_dict"][key], rtol=0, atol=1e-6, msg=key)


def test_fsdp2_fit_equals_ddp_and_writes_one_full_checkpoint(runs):
    fsdp2, ddp = runs["fsdp2"], runs["ddp"]
    assert fsdp2["global_step"] == ddp["global_step"] == 2
    assert_same_weights(fsdp2, ddp)
    trained = [k for k in fsdp2["state_dict"] if k.startswith("connector.")]
    assert trained and fsdp2["optimizer_states"][0]["state"], "the optimizer state is in the file"


def test_fsdp2_resume_restores_weights_and_optimizer_state_as_ddp_does(runs):
    fsdp2, ddp = runs["fsdp2-resumed"], runs["ddp-resumed"]
    assert fsdp2["global_step"] == ddp["global_step"] == 4
    assert_same_weights(fsdp2, ddp)  # Adam's moments too: step 3 would differ otherwise
    moved = [k for k, v in fsdp2["state_dict"].items() if not torch.equal(v, runs["fsdp2"]["state_dict"][k])]
    assert moved and all(k.startswith(("connector.", "encoder.")) for k in moved), moved


def test_every_block_is_a_unit_and_the_root_takes_the_rest(make_frozen):
    """Which modules become FSDP units, in which order (no process group needed to list them)."""
    from mmlm.sharding import shard_units

    model = make_frozen()
    name_of = {id(module): name for name, module in model.named_modules()}
    order = [name_of[id(unit)] for unit in shard_units(model)]
    assert {f"language_model.model.transformer.h.{i}" for i in range(2)} <= set(order)  # GPT-2's blocks
    assert not [name for name in order if name.startswith("connector")]  # the trained connector is in the root unit
    depths = [name.count(".") for name in order]
    assert depths == sorted(depths, reverse=True)  # bottom-up, as fully_shard needs
