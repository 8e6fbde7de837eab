"""``scripts/metalm_tiny.py`` end to end at toy size (the tiny configs' model sizes, 2 steps per stage)."""

from __future__ import annotations

import json
import math
import shutil
import sys

from recipe_scripts import load_script


def test_metalm_tiny_pretrains_finetunes_and_prints_the_table(shapes_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["metalm_tiny"])
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)  # 64 train / 16 val images: reused as they are (same sizes and seed)
    out = tmp_path / "out"
    script = load_script("metalm_tiny")
    code = script.main(["--data-dir", str(data), "--out-dir", str(out), "--train-images", "64",
                       "--val-images", "16", "--pretrain-steps", "2", "--finetune-steps", "2",
                       "--val-batches", "1", "--batch-size", "8", "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MetaLM (semi-causal pretraining 2 steps" in printed and "no docked encoders" in printed
    assert "majority answer" in printed and "per question type" in printed

    results = json.loads((out / "results.json").read_text())
    for key in ("metalm_vqa_acc", "decoder_only_vqa_acc", "majority_vqa_acc"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    for key in ("metalm_val_loss", "decoder_only_val_loss", "pretrain_val_loss"):
        assert math.isfinite(results[key]) and results[key] > 0, (key, results[key])
    assert (out / "pretrain" / "weights.ckpt").is_file()
    assert list((out / "metalm").rglob("predictions/val-vqa-step2.json"))
    assert set(results["metalm_per_type"]) <= {"colour", "shape", "count", "position"} and results["metalm_per_type"]
