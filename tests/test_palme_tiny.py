"""``scripts/palme_tiny.py`` end to end at toy size: data, PaLM-E and the text-only baseline, the table."""

from __future__ import annotations

import json
import math
import sys

from recipe_scripts import load_script


def test_palme_tiny_trains_both_variants_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["palme_tiny"])
    out = tmp_path / "out"
    script = load_script("palme_tiny", register=monkeypatch)
    code = script.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--train", "48", "--val", "16",
                       "--steps", "2", "--val-batches", "1", "--workers", "0", "--batch-size", "8",
                       "--max-new-tokens", "4", "--parallel", "1"])  # no fork inside pytest (autograd already ran)
    assert code == 0
    printed = capsys.readouterr().out
    assert "VQA accuracy" in printed and "plan exact match" in printed and "text_only" in printed

    results = json.loads((out / "results.json").read_text())
    for name in ("palme", "text_only"):
        for key in ("vqa_acc", "plan_exact", "plan_step_acc"):
            assert math.isfinite(results[name][key]) and 0.0 <= results[name][key] <= 1.0, (name, key)
        assert results[name]["per_type"] and list((out / name).rglob("*.ckpt"))
    config = (next((out / "text_only").rglob("config.yaml"))).read_text()
    assert "modalities: []" in config
