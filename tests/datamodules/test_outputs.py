"""Output folders are never clobbered: every data tool refuses a non-empty ``--out`` unless ``--overwrite``, and an
overwrite removes only the files its own earlier run listed in ``summary.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from datamodules.formats.outputs import OutputExistsError, prepare_output, write_summary
from datamodules.tools.make_shards import inspect, make_shards
from mmlm.app.cli import main
from mmlm.app.data import data_parser


def img2dataset_folder(folder: Path) -> list[str]:
    """An img2dataset ``webdataset`` download (9 samples in ``00000.tar``, its parquet and stats); returns its files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rows = []
    with wds.TarWriter(str(folder / "00000.tar")) as writer:
        for i in range(9):
            key = f"00000{i:04d}"
            meta = {"url": f"https://example.com/{i}.jpg", "caption": f"picture {i}", "key": key, "status": "success"}
            writer.write({"__key__": key, "jpg": jpeg((10, 10)), "txt": meta["caption"].encode(),
                          "json": json.dumps(meta).encode()})
            rows.append(meta)
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps({"count": 9, "successes": 9}))
    return sorted(p.name for p in folder.iterdir())


def jpeg(size: tuple[int, int], colour: str = "red") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def karpathy(tmp_path: Path) -> dict[str, Path]:
    """A Flickr-style Karpathy file with 2 test images."""
    images = tmp_path / "flickr"
    images.mkdir()
    entries = []
    for i in range(2):
        (images / f"{i}.jpg").write_bytes(jpeg((12, 10)))
        entries.append({"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentences": [{"raw": f"caption {i}"}]})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return {"json": path, "images": images}


def captions_jsonl(tmp_path: Path, count: int) -> Path:
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (8, 8), "blue").save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"blue square {i}"})
    path = images / f"captions{count}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_convert_karpathy_into_an_img2dataset_folder_is_refused_and_deletes_nothing(tmp_path, karpathy, capsys):
    download = tmp_path / "laion"
    before = img2dataset_folder(download)
    args = ["data", "convert-karpathy", "--karpathy-json", str(karpathy["json"]), "--images", str(karpathy["images"]),
            "--out", str(download)]
    assert main(args) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2  # its files are not an mmlm run's: refused as a whole
    err = capsys.readouterr().err
    assert "00000.parquet" in err and "no earlier mmlm data run" in err
    assert sorted(p.name for p in download.iterdir()) == before
    assert inspect(str(download / "00000.tar"))["samples"] == 9  # the 9 downloaded samples are all there


def test_make_shards_overwrite_removes_its_own_stale_shards_only(tmp_path, capsys):
    out = tmp_path / "shards"
    first = make_shards(captions_jsonl(tmp_path, 5), out, shard_size=2, progress=False)
    assert first["shards"] == 3
    written = json.loads((out / "summary.json").read_text())["files"]
    assert written == ["00000.tar", "00001.tar", "00002.tar"]
    smaller = captions_jsonl(tmp_path, 2)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_shards(smaller, out, shard_size=2, progress=False)
    assert main(["data", "make-shards", str(smaller), "--out", str(out), "--shard-size", "2", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]  # no stale 00001/00002 for a glob to read
    assert inspect(str(out / "*.tar"))["samples"] == 2


def test_overwrite_refuses_a_folder_with_files_the_run_did_not_write(tmp_path):
    out = tmp_path / "shards"
    make_shards(captions_jsonl(tmp_path, 3), out, shard_size=2, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        make_shards(captions_jsonl(tmp_path, 1), out, shard_size=2, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "notes.txt", "summary.json"]


def test_nested_outputs_are_recorded_and_replaced(tmp_path):
    out = tmp_path / "split"
    make_shards(captions_jsonl(tmp_path, 6), out, shard_size=1, progress=False, val_fraction=0.5)
    files = json.loads((out / "summary.json").read_text())["files"]
    assert "train/summary.json" in files and any(f.startswith("val/") and f.endswith(".tar") for f in files)
    make_shards(captions_jsonl(tmp_path, 1), out, shard_size=1, progress=False, overwrite=True)  # no split now
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "summary.json"]  # train/ and val/ removed


def test_prepare_output_creates_and_records(tmp_path):
    out = prepare_output(tmp_path / "new" / "deep")
    (out / "a").mkdir()
    (out / "a" / "x.tar").write_bytes(b"x")
    write_summary(out, {"n": 1})
    assert json.loads((out / "summary.json").read_text()) == {"n": 1, "files": ["a/x.tar"]}
    prepare_output(out, overwrite=True)
    assert list(out.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_output(tmp_path / "file")


def test_vqa_answers_refuses_an_existing_file_unless_overwrite(shapes_data, tmp_path, capsys):
    answers = tmp_path / "answers.json"
    answers.write_text("[]")
    args = ["data", "vqa-answers", str(shapes_data / "train" / "vqa-*.tar"), "--out", str(answers)]
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert answers.read_text() == "[]"
    assert main([*args, "--overwrite"]) == 0
    assert len(json.loads(answers.read_text())) > 1


def tools_with_out() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in data_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: tool for name, tool in sub.choices.items() if any(a.dest == "out" for a in tool._actions)}


def test_every_tool_with_an_out_folder_has_overwrite():
    tools = tools_with_out()
    assert {"synth-shapes", "make-shards", "convert-karpathy", "convert-vqav2", "convert-gqa", "convert-obelics",
            "convert-mmc4", "synth-interleaved", "synth-pairs", "vqa-answers", "cache-features", "synth-docs",
            "synth-receipts", "convert-donut", "synth-tabletop", "text-shards"} <= set(tools)
    assert all(any(a.dest == "overwrite" for a in tool._actions) for tool in tools.values())


@pytest.mark.parametrize("tool", sorted(set(tools_with_out()) - {"vqa-answers"}))
def test_every_tool_refuses_a_non_empty_out_before_any_work(tool, tmp_path, capsys):
    """Placeholder inputs: the refusal comes first (e.g. before cache-features builds a model)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"someone else's shard")
    args = []
    for action in tools_with_out()[tool]._actions:
        if action.dest in ("help", "out") or not (action.required or not action.option_strings):
            continue
        args += [str(tmp_path / "in")] if not action.option_strings else [action.option_strings[0], str(tmp_path / "in")]
    assert main(["data", tool, *args, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "00000.tar").read_bytes() == b"someone else's shard"
