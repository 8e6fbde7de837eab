"""``scripts/kosmos_tiny.py`` end to end at toy size (the tiny config's model, 3 steps, k = 0, 2, 4)."""

from __future__ import annotations

import json
import math
import sys

from recipe_scripts import load_script


def test_kosmos_tiny_trains_and_reports_k_shot_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kosmos_tiny"])
    out = tmp_path / "out"
    script = load_script("kosmos_tiny")
    code = script.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--docs", "32",
                       "--val", "8", "--steps", "3", "--batch-size", "4", "--val-batches", "1",
                       "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "majority answer" in printed and "KOSMOS-1 tiny" in printed
    results = json.loads((out / "results.json").read_text())
    for k in (0, 2, 4):
        assert 0.0 <= results[f"vqa_acc_{k}shot"] <= 1.0
    assert 0.0 < results["majority_vqa_acc"] <= 1.0 and math.isfinite(results["train_loss"])
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["counts"]["docs"] == 32 and list((out).rglob("*.ckpt"))
