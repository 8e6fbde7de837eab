"""``scripts/vlmo_tiny.py`` end to end at toy size: stage 2 → stage 3 → retrieval, VQA and NLVR2 fine-tuning."""

from __future__ import annotations

import json
import math
import sys

from recipe_scripts import load_script


def test_vlmo_tiny_runs_every_stage_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlmo_tiny"])
    out = tmp_path / "out"
    script = load_script("vlmo_tiny")
    code = script.main(["--data-dir", str(tmp_path / "shapes"), "--pairs-dir", str(tmp_path / "pairs"),
                       "--out-dir", str(out), "--train-images", "64", "--val-images", "16",
                       "--train-pairs", "32", "--val-pairs", "16", "--stage2-steps", "2",
                       "--stage3-steps", "2", "--vqa-steps", "2", "--nlvr2-steps", "2", "--val-batches", "1",
                       "--workers", "0", "--shuffle-buffer", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "R@1 image→text" in printed and "R@10 text→image" in printed and "majority answer" in printed
    assert "balanced labels" in printed

    results = json.loads((out / "results.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert math.isfinite(results[key]) and 0.0 <= results[key] <= 100.0, (key, results[key])
    assert results["chance_r1"] == 100.0 / 16 and math.isfinite(results["stage2_mlm_loss"])
    for key in ("vqa_acc", "majority_vqa_acc", "nlvr2_acc"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    answers = json.loads((out / "answers.json").read_text())
    assert "yes" in answers and "2" in answers
    for stage in ("stage2", "stage3", "vqa", "nlvr2"):
        assert list((out / stage).rglob("*.ckpt")), stage
