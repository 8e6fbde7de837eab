"""``scripts/donut_tiny.py`` end to end at toy size (the tiny configs' model sizes, 3 steps per stage)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "donut_tiny.py"


def load_script():
    spec = importlib.util.spec_from_file_location("donut_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_donut_tiny_runs_both_stages_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["donut_tiny"])
    out = tmp_path / "out"
    code = load_script().main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--train-docs", "24",
                               "--train-receipts", "24", "--val-docs", "8", "--read-steps", "3", "--cord-steps", "3",
                               "--batch-size", "4", "--val-batches", "1", "--workers", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TED accuracy" in printed and "most common training JSON" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["val_receipts"] == 4
    for stage in ("cord", "baseline"):
        for key in ("ted_accuracy", "f1"):
            assert 0.0 <= results[stage][key] <= 1.0, (stage, key, results[stage])
        assert math.isfinite(results[stage]["ned"])
    assert 0.0 <= results["read"]["ned"] <= 1.0
    assert set(results["baseline_json"]) == {"menu", "sub_total", "total"}
    export = out / "read" / "export"
    assert (export / "config.json").is_file() and (export / "processor_config.json").is_file()
    rows = [json.loads(line) for line in next((out / "cord").rglob("val-documents-step3.jsonl")).read_text().splitlines()]
    assert len(rows) == 4 and all("prediction" in row and row["references"] for row in rows)
