"""``mmlm memory``: exact per-part weights / gradients / AdamW state from the model built on the meta device, and a
predicted training-step peak that matches the measured one (CPU, torch profiler) on a batch larger than the probe's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mmlm.app import memory
from mmlm.app.cli import main

GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128, "vocab_size": 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def frozen_config(tmp_path, shapes_data, language_model: dict | None = None, batch_size: int = 16) -> str:
    """A tiny Frozen config: narrow resnet10t at 64 px → MLP → frozen 4-layer GPT-2."""
    lm = language_model or {"config": GPT2}
    config = {"seed_everything": 0, "model": {"class_path": "mmlm.models.Frozen", "init_args": {
        "tokenizer": str(shapes_data / "tokenizer"),
        "encoder": {"class_path": "mmlm.encoders.TimmEncoder", "init_args": {
            "name": "resnet10t", "img_size": 64,
            "model_kwargs": {"channels": [8, 16, 32, 32], "stem_width": 8, "output_stride": 16}}},
        "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": lm},
        "connector": {"class_path": "mmlm.connectors.MLP", "init_args": {"num_layers": 2}}}},
        "data": {"class_path": "datamodules.ImageTextDataModule",
                 "init_args": {"batch_size": batch_size, "max_text_tokens": 16}}}
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_json(argv: list[str], capsys) -> dict:
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_parts_are_exact_and_built_on_meta(tmp_path, shapes_data):
    config = frozen_config(tmp_path, shapes_data)
    model = memory.build(memory.write_offline_config(config, tmp_path), "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    parts = {p.name: p for p in memory.model_parts(model)}
    assert set(parts) == {"encoder", "language_model", "connector"}
    lm = parts["language_model"]
    assert lm.status == "frozen" and lm.grads == 0 and lm.optimizer == 0 and lm.dtype == "float32"
    assert lm.params == sum(p.numel() for p in model.language_model.parameters())  # tied head counted once
    encoder = parts["encoder"]
    assert encoder.status == "trainable" and encoder.weights == 4 * encoder.params == encoder.grads
    assert encoder.optimizer == 2 * encoder.grads
    assert sum(p.params for p in parts.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("batch_size", "seq_len"), [(16, 16), (12, 32)])
def test_prediction_matches_the_measured_peak_of_a_training_step(tmp_path, shapes_data, batch_size, seq_len):
    """Probe at batches 2 and 4, predict for a larger batch (and a longer text), measure one whole steady-state step
    (zero_grad, forward, backward, AdamW step) of a freshly built model in one profiled region."""
    config = frozen_config(tmp_path, shapes_data)
    device = torch.device("cpu")
    model = memory.build(config, "cpu")
    predicted = memory.estimate(memory.model_parts(model), memory.probe(model, device, None), batch_size, seq_len)

    fresh = memory.build(config, "cpu")
    optimizer = memory.prepared(fresh, device, None)
    batch = memory.synthetic_batch(fresh, batch_size, seq_len, seed=1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        fresh.training_loss(batch).backward()
        optimizer.step()

    peak, _ = memory.measure(step, device)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    static = sum(t.numel() * t.element_size() for t in [*fresh.parameters(), *state])
    measured = static + peak
    print(f"batch {batch_size} × {seq_len} tokens: predicted {predicted.total / 2**20:.3f} MiB, "
          f"measured {measured / 2**20:.3f} MiB")
    assert predicted.activations > 4 * predicted.weights  # the scaled activations dominate: the check means something
    assert abs(predicted.total - measured) <= 0.15 * measured


def test_cli_json_total_against_the_budget_and_knobs(tmp_path, shapes_data, capsys):
    config = frozen_config(tmp_path, shapes_data)
    out = run_json(["--config", config, "--gpu-memory", "8MB", "--batch-size", "16"], capsys)
    assert out["batch_size"] == 16 and out["seq_len"] == 16 and out["budget"] == 8 * 2**20
    assert [p["name"] for p in out["parts"]] == ["encoder", "language_model", "connector"]
    assert out["fits"] is False and out["estimate"]["total"] > out["budget"]
    knobs = {k["knob"].split(" (")[0]: k for k in out["knobs"]}
    assert knobs["smaller batch + gradient accumulation"]["fits"]
    assert knobs["smaller batch + gradient accumulation"]["batch_size"] < 16
    assert knobs["cached encoder features"]["total"] < out["estimate"]["total"]
    assert knobs["activation checkpointing of the LM"]["total"] < out["estimate"]["total"]
    assert knobs["LoRA r=8 on the LM's attention projections"]["total"] is None  # the LM is frozen already
    assert not any("meta" in note for note in out["notes"])  # built on the meta device
    roomy = run_json(["--config", config, "--gpu-memory", "80GB"], capsys)
    assert roomy["fits"] is True and roomy["knobs"] == []


def test_a_checkpoint_directory_is_read_as_its_config_only(tmp_path, shapes_data, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    export = tmp_path / "lm"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**GPT2)).save_pretrained(export)
    (export / "model.safetensors").unlink()  # no weights: the meta build must not need them
    config = frozen_config(tmp_path, shapes_data, {"name_or_path": str(export)})
    out = run_json(["--config", config, "--no-probe"], capsys)
    lm = next(p for p in out["parts"] if p["name"] == "language_model")
    assert lm["status"] == "frozen" and lm["params"] > 0
    assert out["notes"] == ["--no-probe: activations not measured"]


def test_a_missing_checkpoint_is_one_line(tmp_path, shapes_data, capsys):
    config = frozen_config(tmp_path, shapes_data, {"name_or_path": str(tmp_path / "missing")})
    assert main(["memory", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "does not exist" in err


def test_other_families_say_not_supported(tmp_path, shapes_data, capsys):
    config = {"model": {"class_path": "mmlm.models.CausalLMPretraining", "init_args": {
        "tokenizer": str(shapes_data / "tokenizer"),
        "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": {"config": GPT2}}}}}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    out = run_json(["--config", str(path), "--batch-size", "4"], capsys)
    assert any("not supported yet" in note for note in out["notes"])
    assert out["estimate"]["activations"] == 0 and out["estimate"]["weights"] > 0


def test_rich_table(tmp_path, shapes_data, capsys):
    assert main(["memory", "--config", frozen_config(tmp_path, shapes_data), "--gpu-memory", "8MB"]) == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("encoder", "connector", "frozen", "NOT", "FSDP", "assumption"))


def test_parse_size():
    assert memory.parse_size("24GB") == memory.parse_size("24GiB") == 24 * 2**30
    assert memory.parse_size("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu-memory"):
        memory.parse_size("lots")
