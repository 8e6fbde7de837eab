"""What a run records and prints (mmlm/app/loggers.py, mmlm/app/progress.py, mmlm/app/lightning.py): the default
TensorBoard + CSV loggers with the resolved config, versions and data report; a missing logger package in one line;
plain progress lines when stdout is not a terminal; ``--model.help`` of a ``from_hf`` constructor; a quiet quickstart."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmlm.app.cli import main
from mmlm.app.loggers import logger_problem

ROOT = Path(__file__).resolve().parents[1]
TEXT_LM = ROOT / "configs" / "tiny" / "text_lm.yaml"


def tiny_text_lm(shapes_data: Path, root: Path, tiny_gpt2: dict, steps: int = 4) -> list[str]:
    """``mmlm fit`` of the tiny text LM for ``steps`` steps on the test shards, logging every 2 steps."""
    def sources(split: str) -> str:
        return json.dumps([{"urls": str(shapes_data / split / "vqa-*.tar"), "kind": "vqa"}])

    return ["fit", "--config", str(TEXT_LM), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "2",
            "--trainer.enable_model_summary", "false", "--model.init_args.generation.max_new_tokens", "3",
            "--model.init_args.language_model.init_args.config", json.dumps(tiny_gpt2),
            "--model.init_args.export_dir", "null", "--model.init_args.tokenizer", str(shapes_data / "tokenizer"),
            "--data.init_args.train", sources("train"), "--data.init_args.val", sources("val"),
            "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0"]


def test_a_missing_logger_package_is_named_in_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(TEXT_LM), "--trainer.logger", "WandbLogger"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'wandb'" in err[0] and "pip install 'mmlm[wandb]'" in err[0], err
    mlflow = {"class_path": "pytorch_lightning.loggers.MLFlowLogger"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "mmlm[mlflow]" in logger_problem([mlflow])
    assert logger_problem(None) is None and logger_problem(True) is None


def test_a_tiny_fit_writes_tensorboard_and_csv_with_config_versions_and_data_report(shapes_data, tmp_path,
                                                                                   tiny_gpt2, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(tiny_text_lm(shapes_data, tmp_path, tiny_gpt2)) == 0
    out = capsys.readouterr().out
    log_dir = tmp_path / "lightning_logs" / "version_0"
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events and (log_dir / "metrics.csv").is_file() and (log_dir / "config.yaml").is_file()

    tensorboard = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert "train/loss" in tensorboard.Tags()["scalars"] and "data/total_skipped" in tensorboard.Tags()["scalars"]
    assert {"config/text_summary", "data_report/fit/text_summary"} <= set(tensorboard.Tags()["tensors"])
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["config"]["trainer"]["max_steps"] == 4 and hparams["versions"]["torch"]

    # stdout is not a terminal here: plain lines every 2 steps and one per evaluation, no bar
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" |")[0] for line in steps] == ["step 2/4", "step 4/4"], lines
    assert all(re.search(r"train/loss [\d.]+ \| lr [\d.e+-]+ \| \d+ samples/s \| ETA \d+:\d\d:\d\d", s) for s in steps)
    assert any(line.startswith("validation at step 4: 1 batches in") and "val/vqa_acc" in line for line in lines)


def test_model_help_works_for_from_hf_constructors(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.help", "mmlm.models.Blip2.from_hf"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert "--model.init_args.name_or_path" in shown and "Help for --model.help=mmlm.models.Blip2.from_hf" in shown


def test_quickstart_prints_no_warnings_tips_or_bars_into_a_log(tmp_path):
    """``mmlm quickstart > log`` at a reduced size: life (a line per evaluation), no warning, tip or ``\\r`` bar."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "mmlm.app.cli", "quickstart", "--data-dir", str(tmp_path / "data"),
         "--out-dir", str(tmp_path / "out"), "--train-images", "32", "--val-images", "16", "--lm-steps", "2",
         "--frozen-steps", "2", "--val-batches", "1", "--workers", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = (done.stdout + done.stderr).splitlines()
    noise = [line for line in printed if re.search(r"Warning|Tip|\.py:\d+: |it/s\]", line)]
    assert noise == [], noise
    assert sum(line.startswith("validation at step 2:") for line in printed) == 2, printed
    assert len(printed) < 60, printed


def test_mlflow_logger_records_metrics_the_config_and_the_data_report(shapes_data, tmp_path, tiny_gpt2, monkeypatch):
    """``--trainer.logger MLFlowLogger`` with a local file store (no server, no network): the run's metrics, the
    config and versions as params, the config and the data report as text artifacts."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder needs this (docs)
    uri = (tmp_path / "mlruns").as_uri()
    logger = {"class_path": "pytorch_lightning.loggers.MLFlowLogger",
              "init_args": {"experiment_name": "tiny", "tracking_uri": uri}}
    assert main(tiny_text_lm(shapes_data, tmp_path, tiny_gpt2) + ["--trainer.logger", json.dumps(logger)]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert "train/loss" in run.data.metrics and "val/vqa_acc" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 3]
    assert any(key.startswith("versions") for key in run.data.params), sorted(run.data.params)[:10]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.txt" in artifacts and any(a.startswith("data_report") for a in artifacts), artifacts


def test_wandb_logger_records_metrics_the_config_and_the_data_report_offline(shapes_data, tmp_path, tiny_gpt2,
                                                                              monkeypatch):
    """``--trainer.logger WandbLogger`` in W&B's offline mode (no account, no network): W&B's run folder holds the
    config with the package versions, and a summary with the last metrics, the config text and the data report;
    mmlm's own files (config, metrics.csv, predictions) go to a run folder of their own, not to W&B's ``save_dir``
    (the working folder by default, where they would overwrite a user's ``config.yaml``)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: true\n")
    logger = {"class_path": "pytorch_lightning.loggers.WandbLogger", "init_args": {"project": "tiny"}}
    root = tmp_path / "runs"
    try:
        assert main(tiny_text_lm(shapes_data, root, tiny_gpt2) + ["--trainer.logger", json.dumps(logger)]) == 0
    finally:
        wandb.finish()  # the CLI's process exit does this; W&B writes its last records then
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    run = root / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "predictions").is_dir()
    assert "train/loss" in (run / "metrics.csv").read_text()
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    for _ in range(300):  # W&B's core process may still be writing the run's last records
        if ("exit", {}) in (records := wandb_records(log)):
            break
        time.sleep(0.1)
    assert ("exit", {}) in records, "the offline run file has no exit record after 30 s"
    steps = [json.loads(items["trainer/global_step"]) for kind, items in records if kind == "history"
             and "train/loss" in items]
    assert steps == [1, 3] and any("val/vqa_acc" in items for kind, items in records if kind == "history")
    config = {key: json.loads(value) for kind, items in records if kind == "config" for key, value in items.items()}
    assert config["versions"]["torch"] and config["config"]["trainer"]["max_steps"] == 4
    summary = {key: json.loads(value) for kind, items in records if kind == "summary" for key, value in items.items()}
    assert "max_steps: 4" in summary["config"] and "samples skipped" in summary["data_report/fit"], sorted(summary)


def wandb_records(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The records of an offline W&B run file (``run-*.wandb``), each as its kind and ``{key: JSON value}`` (the
    items of history, config and summary records; empty for other kinds, e.g. the final ``exit``).

    wandb 0.25 (the version lmms-eval pins) still has a Python reader (``wandb.sdk.internal.datastore``); later
    versions (0.31) leave reading to the Go core only, so the test reads the format itself, the same for both: a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks of 32 KiB whose chunks (4-byte CRC,
    2-byte length, 1-byte type: full, first, middle, last) carry serialised ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks, which = b"", record.WhichOneof("record_type")
            items = (record.history.item if which == "history" else getattr(record, which).update
                     if which in ("config", "summary") else [])
            records.append((which, {i.key or "/".join(i.nested_key): i.value_json for i in items}))
    return records


def test_a_run_folder_logger_comes_first(tmp_path):
    """A chosen TensorBoard or CSV logger moves to the front (no second version folder); with neither, a new CSV
    logger is put first; a list that starts with one, or an empty one, is left as it is."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from pytorch_lightning.loggers.logger import DummyLogger

    from mmlm.app.loggers import with_run_folder

    other, tensorboard = DummyLogger(), TensorBoardLogger(save_dir=str(tmp_path))
    assert with_run_folder([other, tensorboard], str(tmp_path)) == [tensorboard, other]
    assert with_run_folder([tensorboard, other], str(tmp_path)) == [tensorboard, other]
    assert with_run_folder([], str(tmp_path)) == []
    first, rest = with_run_folder([other], str(tmp_path))[0], with_run_folder([other], str(tmp_path))[1:]
    assert isinstance(first, CSVLogger) and rest == [other] and first.log_dir.startswith(str(tmp_path))
