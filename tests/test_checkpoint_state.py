"""What goes into checkpoints: plain hyperparameters (``weights_only`` and ``yaml.safe_load`` safe), builders, and
frozen parts left out of checkpoints and re-read from their source — refused when the source changed, with resume
exact and ``load_from_checkpoint`` rebuilding the module on its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import Blip2Config, Blip2ForConditionalGeneration

from mmlm.checkpoint_state import FROZEN_KEY, fingerprint, leave_out_frozen, plain, restore_frozen
from mmlm.freezing import Freezable, freeze_
from mmlm.language import GenerationConfig
from mmlm.models import Blip2
from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer


def test_plain_keeps_configs_and_drops_objects():
    value = {"generation": GenerationConfig(max_new_tokens=3), "betas": (0.9, 0.98), "encoder": nn.Linear(2, 2),
             "connector": nn.Linear, "parts": {"class_path": "x.Y", "init_args": {"size": [1, 2]}}, "none": None}
    out = plain(value)
    assert out["generation"]["max_new_tokens"] == 3 and out["betas"] == [0.9, 0.98] and out["none"] is None
    assert "encoder" not in out and "connector" not in out and out["parts"]["init_args"]["size"] == [1, 2]
    assert yaml.safe_load(yaml.safe_dump(out)) == out


class Part(Freezable):
    def __init__(self, width: int, source: str | None) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.source = source


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = freeze_(Part(8, "hub/big"))  # 72 frozen parameters with a source
        self.random = freeze_(Part(2, None))  # frozen, random init: no source, always saved
        self.head = nn.Linear(2, 1)  # 3 trainable parameters


def test_frozen_parts_with_a_source_are_left_out_and_refused_when_they_change():
    toy = Toy()
    checkpoint = {"state_dict": dict(toy.state_dict())}
    leave_out_frozen(toy, checkpoint, "auto")
    assert set(checkpoint["state_dict"]) == {"random.linear.weight", "random.linear.bias", "head.weight", "head.bias"}
    assert checkpoint[FROZEN_KEY]["sources"] == {"big": "hub/big"}
    restore_frozen(toy, checkpoint)  # the same source: put back
    assert torch.equal(checkpoint["state_dict"]["big.linear.weight"], toy.big.linear.weight)

    changed = {"state_dict": {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("big.")},
               FROZEN_KEY: checkpoint[FROZEN_KEY]}
    with torch.no_grad():
        toy.big.linear.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"big\.linear\.weight.*hub/big.*values"):
        restore_frozen(toy, changed)


def test_policy_save_keeps_everything_and_auto_keeps_small_frozen_parts():
    toy = Toy()
    checkpoint = {"state_dict": dict(toy.state_dict())}
    leave_out_frozen(toy, checkpoint, "save")
    assert FROZEN_KEY not in checkpoint and len(checkpoint["state_dict"]) == 6
    toy.head = nn.Linear(2, 100)  # now the trainable part is larger than the frozen one
    checkpoint = {"state_dict": dict(toy.state_dict())}
    leave_out_frozen(toy, checkpoint, "auto")
    assert FROZEN_KEY not in checkpoint
    leave_out_frozen(toy, checkpoint, "source")
    assert "big.linear.weight" not in checkpoint["state_dict"]


def test_fingerprint_sees_a_change_anywhere_in_a_sampled_position():
    weight = torch.randn(1000, 1000)
    changed = weight.clone()
    changed.view(-1)[0] += 1e-6
    assert fingerprint(weight) == fingerprint(weight.clone()) and fingerprint(weight) != fingerprint(changed)


# ---------------------------------------------------------------------------------- BLIP-2 from_hf, end to end


@pytest.fixture
def hf_checkpoint(shapes_data, tmp_path) -> Path:
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    opt = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
           "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
           "bos_token_id": 1, "eos_token_id": 2}
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0},  # no dropout: runs compare bit for bit
        text_config=opt, num_query_tokens=2, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    directory = tmp_path / "blip2"
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class StopAt(pl.Callback):
    """Stop after ``step`` optimizer steps (a run planned for more, interrupted: its schedule is the full run's)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def fit(model: Blip2, batch, root: Path, steps: int, ckpt_path: str | None = None, stop_at: int | None = None
        ) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[StopAt(stop_at)] if stop_at else [])
    trainer.fit(model, DataLoader([batch] * 8, batch_size=None, collate_fn=lambda b: b), ckpt_path=ckpt_path)
    return trainer


def test_blip2_checkpoint_leaves_out_its_frozen_parts_and_resumes_exactly(hf_checkpoint, shapes_batch, tmp_path):
    torch.manual_seed(0)
    model = Blip2.from_hf(str(hf_checkpoint), lr=1e-2, warmup_steps=0)
    batch = shapes_batch(kind="vqa", size=4, image_size=32, model=model)
    fit(model, batch, tmp_path / "a", 4, stop_at=2)  # interrupted after 2 of 4 steps
    (first,) = (tmp_path / "a").rglob("*.ckpt")
    state = torch.load(first, weights_only=True)
    assert state["global_step"] == 2 and state["mmlm_builder"] == "from_hf" and state["hyper_parameters"]["name_or_path"] == str(hf_checkpoint)
    assert not any(k.startswith(("encoder.", "language_model.")) for k in state["state_dict"])
    assert set(state[FROZEN_KEY]["sources"]) == {"encoder", "language_model"}

    reloaded = Blip2.load_from_checkpoint(str(first))  # rebuilt by from_hf, frozen parts re-read and checked
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    resumed = Blip2.from_hf(str(hf_checkpoint), lr=1e-2, warmup_steps=0)
    fit(resumed, batch, tmp_path / "a", 4, ckpt_path=str(first))
    straight = Blip2.from_hf(str(hf_checkpoint), lr=1e-2, warmup_steps=0)
    fit(straight, batch, tmp_path / "b", 4)
    for key, value in straight.state_dict().items():  # 2 + 2 steps through the lean checkpoint == 4 steps
        assert torch.equal(resumed.state_dict()[key], value), key


def test_changed_frozen_source_is_refused_through_the_cli(hf_checkpoint, shapes_batch, shapes_data, tmp_path,
                                                          monkeypatch):
    model = Blip2.from_hf(str(hf_checkpoint))
    fit(model, shapes_batch(kind="vqa", size=4, image_size=32, model=model), tmp_path / "run", 1)
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    weights = hf_checkpoint / "model.safetensors"
    tensors = load_file(weights)
    tensors["language_model.model.decoder.layers.0.fc1.weight"] += 0.01
    save_file(tensors, weights)

    from mmlm.app.cli import main

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    val = f'[{{"urls": "{shapes_data}/val/vqa-*.tar", "kind": "vqa"}}]'
    with pytest.raises(ValueError, match=r"language_model\.model\.model\.decoder\.layers\.0\.fc1\.weight.*values.*source changed"):
        main(["validate", "--config", str(Path(__file__).resolve().parents[1] / "configs/blip2/eval_vqav2_zeroshot.yaml"),
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.limit_val_batches", "1",
              "--trainer.default_root_dir", str(tmp_path / "eval"), "--model.init_args.name_or_path", str(hf_checkpoint),
              "--model.init_args.vision_dtype", "float32", "--model.init_args.lm_dtype", "float32",
              "--data.init_args.val", val, "--data.init_args.num_workers", "0", "--ckpt_path", str(checkpoint)])


def test_a_run_that_ends_between_validations_still_saves_its_last_step(hf_checkpoint, shapes_batch, tmp_path):
    from mmlm.app.reliability import FinalCheckpoint

    model = Blip2.from_hf(str(hf_checkpoint))
    batch = shapes_batch(kind="vqa", size=4, image_size=32, model=model)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), check_val_every_n_epoch=None,
                         val_check_interval=100, callbacks=[FinalCheckpoint()])
    loader = DataLoader([batch] * 8, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(model, loader, loader)  # stops at step 3, long before validation
    (saved,) = tmp_path.rglob("*.ckpt")
    assert saved.name.endswith("step=3.ckpt") and torch.load(saved, weights_only=True)["global_step"] == 3
