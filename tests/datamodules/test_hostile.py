"""Hostile data: every kind of bad sample is converted or skipped, counted per reason and reported."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from datamodules.pipeline.skips import SkipCounter, SkipSample, collecting_notes
from datamodules.pipeline.transforms import decode_image
from datamodules.synthetic.hostile import COUNTED_AS, write_hostile
from mmlm.app.cli import main
from mmlm.app.reliability import DataReport, format_report


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_image"),
    (b"\xff\xd8\xff\xe0 not really a jpeg", "bad_image"),
    (png(Image.new("RGB", (64, 64)))[:60], "bad_image"),  # truncated file
    (png(Image.new("1", (1200, 1000))), "image_too_large"),
])
def test_bad_images_are_skipped_with_their_reason(data, reason):
    with pytest.raises(SkipSample) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.reason == reason


def test_pixel_limit_is_configurable_and_checked_before_decoding():
    bomb = png(Image.new("1", (1200, 1000)))
    assert decode_image(bomb, max_pixels=None).size == (1200, 1000)
    assert decode_image(bomb, max_pixels=1_200_000).mode == "RGB"


@pytest.mark.parametrize("image, kind", [
    (Image.new("L", (4, 4), 9), "grayscale"), (Image.new("RGBA", (4, 4), (1, 2, 3, 0)), "alpha"),
    (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), "16bit"), (Image.new("P", (4, 4), 1), "palette"),
])
def test_conversions_are_noted(image, kind):
    with collecting_notes() as notes:
        decoded = decode_image(png(image))
    assert decoded.mode == "RGB" and notes.skipped == {f"converted_{kind}": 1}


def test_notes_go_to_the_innermost_open_collection_and_nowhere_outside_one():
    """A note outside any ``collecting_notes`` block is dropped; blocks nest and restore the outer one on exit,
    also when the inner block raises (a skipped sample)."""
    gray = png(Image.new("L", (4, 4), 9))
    decode_image(gray)  # no collection open: dropped, no error
    with collecting_notes() as outer:
        decode_image(gray)
        with pytest.raises(SkipSample), collecting_notes() as inner:
            decode_image(gray)
            raise SkipSample("bad_sample")
        decode_image(gray)
    decode_image(gray)
    assert outer.skipped == {"converted_grayscale": 2} and inner.skipped == {"converted_grayscale": 1}


def test_report_table_separates_skips_and_conversions():
    text = format_report("fit", {"bad_image": 2, "converted_cmyk": 1, "tar_error": 1})
    assert text.splitlines()[0] == "data report (fit): 3 samples skipped, 1 converted"
    assert "bad_image" in text and "converted_cmyk" in text
    assert SkipCounter({"bad_image": 2, "converted_cmyk": 5}).total() == 2


def test_hostile_set_trains_to_completion_and_reports_exact_counts(tmp_path, capsys):
    summary = write_hostile(tmp_path / "data")
    assert summary["hostile"] / summary["samples"] == 0.05
    assert set(summary["expected"]) == set(COUNTED_AS.values())  # every kind is in the set
    keys = tmp_path / "keys.tsv"
    recorder = {"class_path": "resume_probe.KeyRecorder", "init_args": {"path": str(keys)}}
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}
    main(["fit", "--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule",
          f"--data.init_args.train={json.dumps([{'urls': summary['captions']}])}",
          f"--data.init_args.val={json.dumps([{'urls': summary['vqa'], 'kind': 'vqa'}])}",
          f"--data.init_args.tokenizer={tmp_path / 'data' / 'tokenizer'}", "--data.init_args.image_size=8",
          "--data.init_args.batch_size=2", "--data.init_args.shuffle_buffer=16", "--data.init_args.num_workers=1",
          f"--data.init_args.max_image_pixels={summary['max_image_pixels']}",
          "--trainer.max_epochs=1", "--trainer.max_steps=1000", f"--trainer.logger={json.dumps(logger)}",
          "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
          "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
          f"--trainer.callbacks+={json.dumps(recorder)}"])
    log_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "data_report-fit.json").read_text())
    assert report == summary["expected"]
    logged = {}  # the run's logger got the totals too
    with open(log_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            logged.update({k: float(v) for k, v in row.items() if k.startswith("data/total_") and v})
    assert logged["data/total_skipped_tar_error"] == 1 and logged["data/total_converted_cmyk"] == 1
    assert len(logged) == len(summary["expected"]) + 1  # every reason, and the skipped total
    assert logged["data/total_skipped"] == sum(n for r, n in summary["expected"].items() if not r.startswith("converted"))
    trained = [k for line in keys.read_text().splitlines() for k in line.split("\t")[1].split()]
    assert sorted(trained) == sorted(k for k in summary["used_keys"] if k.startswith("captions"))
    out = capsys.readouterr().out
    assert "data report (fit): 8 samples skipped, 4 converted" in out


def test_data_report_is_a_default_callback_and_not_doubled(tmp_path):
    cli = main_cli(["--trainer.logger=false"])
    assert sum(isinstance(c, DataReport) for c in cli.trainer.callbacks) == 1
    cli = main_cli(["--trainer.callbacks+=mmlm.app.reliability.DataReport"])
    assert sum(isinstance(c, DataReport) for c in cli.trainer.callbacks) == 1


def main_cli(extra: list[str]):
    from mmlm.app.lightning import lightning_cli

    return lightning_cli(["--model=resume_probe.KeyModel", "--data=datamodules.ImageTextDataModule",
                          "--trainer.accelerator=cpu", *extra], run=False)


