"""``scripts/donut_tiny.py`` end to end at toy size (the tiny configs' model sizes, 3 steps per stage)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from recipe_scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "donut_tiny.py"


def test_donut_tiny_runs_both_stages_and_prints_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["donut_tiny"])
    out = tmp_path / "out"
    script = load_script("donut_tiny")
    code = script.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), "--train-docs", "24",
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
    weights = torch.load(out / "read" / "export" / "weights.pt", weights_only=True)  # stage 2's init_from
    assert weights["donut_added_tokens"][0] == "<s_synthdog>" and "encoder.model.conv1.0.weight" in weights["state_dict"]
    rows = [json.loads(line) for line in next((out / "cord").rglob("val-documents-step3.jsonl")).read_text().splitlines()]
    assert len(rows) == 4 and all("prediction" in row and row["references"] for row in rows)


def test_predict_from_the_finetuned_checkpoint_writes_json_per_receipt(tmp_path, monkeypatch):
    """``mmlm predict`` with the stage-2 config and checkpoint: the field tokens come back in their trained order
    (the datamodule adds them, the checkpoint checks them), one JSON per receipt and a JSONL of all."""
    from mmlm.app.cli import main
    from mmlm.evaluation.documents import file_name

    monkeypatch.setattr(sys, "argv", ["mmlm"])
    out, data = tmp_path / "out", tmp_path / "data"
    script = load_script("donut_tiny")
    assert script.main(["--data-dir", str(data), "--out-dir", str(out), "--train-docs", "16",
                       "--train-receipts", "16", "--val-docs", "4", "--read-steps", "2", "--cord-steps", "2",
                       "--batch-size", "4", "--val-batches", "1", "--workers", "0"]) == 0
    checkpoint = next((out / "cord").rglob("*.ckpt"))
    predict = json.dumps([{"path": str(data / "receipts" / "shards" / "validation"), "task": "cord-v2"}])
    assert main(["predict", "--config", str(SCRIPT.parents[1] / "configs" / "tiny" / "donut_cord.yaml"),
                 "--ckpt_path", str(checkpoint), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "predict"),
                 "--model.init_args.tokenizer", str(data / "docs" / "tokenizer"),
                 "--model.init_args.init_from", str(out / "read" / "export" / "weights.pt"),
                 "--model.init_args.predictions_dir", str(tmp_path / "predict"), "--data.init_args.predict", predict,
                 "--data.init_args.train_path", str(data / "receipts" / "shards" / "train"),
                 "--data.init_args.val_path", str(data / "receipts" / "shards" / "validation"),
                 "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]) == 0
    step = torch.load(checkpoint, weights_only=True)["global_step"]  # files are named by the weights' step
    assert step == 2
    stem = tmp_path / "predict" / "predictions" / f"predict-documents-step{step}"
    rows = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len(list(stem.glob("*.json"))) == 4
    for row in rows:
        assert json.loads((stem / f"{file_name(row['id'])}.json").read_text()) == row["prediction"]
