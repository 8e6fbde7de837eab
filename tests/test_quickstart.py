"""``mmlm quickstart`` end to end at a reduced size (the configs' model sizes, 3 steps per stage)."""

from __future__ import annotations

import json
import math
import sys

from mmlm.app.cli import main


def test_quickstart_runs_both_stages_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mmlm"])
    out = tmp_path / "out"
    code = main(["quickstart", "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
                 "--train-images", "64", "--val-images", "16", "--lm-steps", "3", "--frozen-steps", "3",
                 "--val-batches", "1", "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "VQA accuracy" in printed and "majority" in printed

    results = json.loads((out / "results.json").read_text())
    for key in ("vqa_acc", "majority_vqa_acc", "blind_lm_vqa_acc"):
        assert math.isfinite(results[key]) and 0.0 <= results[key] <= 1.0, (key, results[key])
    assert math.isfinite(results["cider"]) and results["cider"] >= 0.0
    assert results["majority_vqa_acc"] > 0.0
    assert results["train_images"] == 64
    assert (tmp_path / "data" / "summary.json").is_file()
    assert (out / "text_lm" / "export" / "config.json").is_file()
