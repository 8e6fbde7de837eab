"""``scripts/blip2_tiny.py`` end to end at toy size (the tiny configs' model sizes, 3 steps per stage)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from recipe_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "blip2_tiny.py"


def test_blip2_tiny_runs_both_stages_on_a_timm_backbone_file_and_prints_the_table(tmp_path, capsys, monkeypatch):
    """The recipe with ``--vision-backbone`` (the weights file ``scripts/dino_tiny.py`` writes) and
    ``--compare-backbone`` (a second one, e.g. the ViT before DINO): both stages of each run freeze the DINO config's
    timm ViT with exactly that file's weights, and the table prints the compared encoder's column."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from mmlm.encoders import TimmEncoder

    script = load_script("blip2_tiny")
    args = yaml.safe_load((ROOT / "configs" / "tiny" / "dino.yaml").read_text())["model"]["init_args"]["encoder"]
    backbones = {}
    for seed, name in ((3, "backbone.safetensors"), (4, "random_backbone.safetensors")):
        torch.manual_seed(seed)
        backbones[name] = TimmEncoder(**args["init_args"]).model.state_dict()
        save_file({k: v.contiguous() for k, v in backbones[name].items()}, str(tmp_path / name))
    monkeypatch.setattr(sys, "argv", ["blip2_tiny"])
    out = tmp_path / "out"
    code = script.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--train-images", "64",
                       "--val-images", "16", "--lm-steps", "3", "--stage1-steps", "3", "--stage2-steps", "3",
                       "--val-batches", "1", "--itm-rerank-k", "4", "--workers", "0",
                       "--vision-backbone", str(tmp_path / "backbone.safetensors"),
                       "--compare-backbone", str(tmp_path / "random_backbone.safetensors")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "R@1 image→text (ITC)" in printed and "ITM top-4" in printed and "majority answer" in printed
    assert "colour questions" in printed and "compared encoder" in printed
    for run_dir, name in ((out, "backbone.safetensors"), (out / "compare", "random_backbone.safetensors")):
        backbone = backbones[name]
        for stage in ("stage1", "stage2"):  # each stage froze exactly the file's weights
            ckpt = torch.load(next((run_dir / stage).rglob("*.ckpt")), map_location="cpu", weights_only=True)
            stored = {key.removeprefix("encoder.model."): value for key, value in ckpt["state_dict"].items()
                      if key.startswith("encoder.model.")}
            if stored:  # kept in the checkpoint
                assert stored.keys() == backbone.keys() and all(torch.equal(stored[k], backbone[k]) for k in backbone)
            else:  # a lean checkpoint: left out, re-read from the file named as the encoder's source
                source = json.dumps(ckpt["hyper_parameters"]["encoder"], default=str)
                assert str(tmp_path / name) in source, (run_dir, stage)

    results = json.loads((out / "results.json").read_text())
    for run in (results, results["compare"]):
        for key in ("i2t_r1", "t2i_r1", "rerank_i2t_r1", "rerank_t2i_r1"):
            assert math.isfinite(run[key]) and 0.0 <= run[key] <= 100.0, (key, run[key])
        assert 0.0 <= run["vqa_acc"] <= 1.0 and math.isfinite(run["cider"]) and run["cider"] >= 0.0
        assert set(run["vqa_acc_by_type"]) == {"colour", "shape", "count", "position"}
    assert results["chance_r1"] == 100.0 / 16
    assert 0.0 <= results["majority_vqa_acc"] <= 1.0
    assert results["vision"] == str(tmp_path / "backbone.safetensors")
    assert results["compare"]["vision"] == str(tmp_path / "random_backbone.safetensors")
    assert set(results["blind_lm_vqa_acc_by_type"]) == {"colour", "shape", "count", "position"}
    assert (out / "text_lm" / "export" / "config.json").is_file() and not (out / "vit").exists()
    assert not (out / "compare" / "text_lm").exists()  # one text LM, the same blind baseline for both encoders


def test_blip2_tiny_names_a_missing_backbone_file_before_any_work(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--compare-backbone .*nope.safetensors: no such weights file"):
        load_script("blip2_tiny").run_blip2_tiny(data_dir=tmp_path / "data", out_dir=tmp_path / "out",
                                                 compare_backbone=str(tmp_path / "nope.safetensors"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_blip2_tiny_saves_one_random_vit_that_both_stages_load(tmp_path):
    """Without ``--vision-backbone`` both stages read one saved random transformers ViT of the stage configs' sizes
    (initialised with ``initializer_range`` 0.02, so its tokens differ between images)."""
    from mmlm.encoders import HFVisionEncoder

    path = load_script("blip2_tiny").save_vit(tmp_path / "vit", seed=0)
    encoder = HFVisionEncoder(name_or_path=str(path), freeze=True, layer=4)
    import torch

    tokens = encoder(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 65, 64) and (tokens[0] - tokens[1]).abs().mean() > 1e-2


def test_blip2_tiny_lora_variant_trains_adapters_on_the_frozen_lm(tmp_path, capsys, monkeypatch):
    """``--lora-rank 2`` (on the saved random ViT, with ``--text-lm text_lm_reading.yaml``): stage 2 trains peft LoRA
    adapters on the LM's attention — B moves off its zero start — while the LM's own weights stay frozen: those of the
    text stage's export."""
    import torch

    script = load_script("blip2_tiny")
    monkeypatch.setattr(sys, "argv", ["blip2_tiny"])
    out = tmp_path / "out"
    code = script.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--train-images", "64",
                        "--val-images", "16", "--lm-steps", "3", "--stage1-steps", "3", "--stage2-steps", "3",
                        "--val-batches", "1", "--itm-rerank-k", "0", "--workers", "0", "--lora-rank", "2",
                        "--text-lm", "text_lm_reading.yaml"])
    assert code == 0
    assert "stage-2 LM (text_lm_reading.yaml): LoRA rank 2" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["stage2_lm"] == "LoRA rank 2" and 0.0 <= results["vqa_acc"] <= 1.0
    # the text LM trained from text_lm_reading.yaml: VQA lines after the caption too, re-rooted to the data dir
    import yaml

    lm_config = yaml.safe_load(next((out / "text_lm").rglob("config.yaml")).read_text())
    train = lm_config["data"]["init_args"]["train"]
    assert [(row["kind"], row.get("prompt")) for row in train] == [
        ("vqa", None), ("vqa", "{caption} Question: {} Answer:"), ("caption", None)]
    assert all(str(tmp_path / "data") in row["urls"] for row in train)

    ckpt = torch.load(next((out / "stage2").rglob("*.ckpt")), map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    lora_a = {k: v for k, v in state.items() if ".lora_A." in k}
    lora_b = {k: v for k, v in state.items() if ".lora_B." in k}
    assert len(lora_a) == len(lora_b) == 2 * 4  # c_attn and attn.c_proj in each of the 4 GPT-2 blocks
    assert all(v.shape[0] == 2 for v in lora_a.values()) and all(v.shape[1] == 2 for v in lora_b.values())
    assert any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: trained
    # the LM's own weights stay frozen: the lean checkpoint keeps only the adapters and names the export as the base
    assert {k for k in ckpt["state_dict"] if k.startswith("language_model.")} == lora_a.keys() | lora_b.keys()
    assert str(out / "text_lm" / "export") in json.dumps(ckpt["hyper_parameters"]["language_model"], default=str)


def test_blip2_tiny_names_a_negative_lora_rank():
    import pytest

    with pytest.raises(ValueError, match="--lora-rank -1"):
        load_script("blip2_tiny").lora_args(-1)
    with pytest.raises(ValueError, match="--text-lm text_lm_x.yaml: no such config"):
        load_script("blip2_tiny").run_blip2_tiny(data_dir="/nonexistent/data", text_lm="text_lm_x.yaml")
    assert load_script("blip2_tiny").lora_args(0) == []


def test_eval_vqav2_zeroshot_config_runs_from_hf_on_a_tiny_checkpoint(shapes_data, tmp_path, monkeypatch):
    """The real-size zero-shot VQA config (``class_path: mmlm.models.Blip2.from_hf``, beam 5,
    length penalty 0 as LAVIS for OPT)
    validated on CPU with a random tiny ``Blip2ForConditionalGeneration`` directory and the shapes VQA shards."""
    import torch
    import yaml
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from mmlm.app.cli import main
    from mmlm.tokenizers import IMAGE_TOKEN, load_tokenizer

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    tokenizer = load_tokenizer(shapes_data / "tokenizer", [IMAGE_TOKEN])
    opt = {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
           "vocab_size": 100, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "pad_token_id": 0,
           "bos_token_id": 1, "eos_token_id": 2}
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "encoder_hidden_size": 32, "cross_attention_frequency": 1},
        text_config=opt, num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    checkpoint = tmp_path / "blip2-tiny"
    Blip2ForConditionalGeneration(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    root = tmp_path / "eval"
    val = json.dumps([{"urls": str(shapes_data / "val" / "vqa-*.tar"), "kind": "vqa"}])
    assert main(["validate", "--config", str(SCRIPT.parents[1] / "configs" / "blip2" / "eval_vqav2_zeroshot.yaml"),
                 "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--model.init_args.name_or_path", str(checkpoint), "--model.init_args.vision_dtype", "float32",
                 "--model.init_args.lm_dtype", "float32", "--model.init_args.predictions_dir", str(root),
                 "--data.init_args.val", val, "--data.init_args.batch_size", "4",
                 "--data.init_args.num_workers", "0"]) == 0
    settings = json.loads((root / "predictions" / "val-vqa-step0.generation.json").read_text())
    assert settings["generation"] == {"max_new_tokens": 10, "num_beams": 5, "length_penalty": 0.0,
                                      "min_new_tokens": 1, "repetition_penalty": 1.0, "do_sample": False,
                                      "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    rows = json.loads((root / "predictions" / "val-vqa-step0.json").read_text())
    assert len(rows) == 4 and all(isinstance(row["answer"], str) for row in rows)
    declared = yaml.safe_load((SCRIPT.parents[1] / "configs" / "blip2" / "eval_vqav2_zeroshot.yaml").read_text())
    assert declared["data"]["init_args"]["vqa_prompt"] == "Question: {} Short answer:"
