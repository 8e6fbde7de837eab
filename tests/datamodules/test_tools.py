"""Data tools: make_shards from jsonl / tsv / COCO inputs, read back with inspect."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from datamodules.tools.make_shards import inspect, make_shards, print_inspection


def save_image(path: Path, mode: str = "RGB", color=(0, 128, 255), fmt: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 8), color).save(path, format=fmt)
    return path.name


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    save_image(folder / "rgb.jpg")
    save_image(folder / "gray.png", mode="L", color=90)
    save_image(folder / "rgba.png", mode="RGBA", color=(255, 0, 0, 0))
    save_image(folder / "cmyk.jpg", mode="CMYK", color=(0, 0, 0, 0))
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def read_back(summary: dict) -> dict:
    return inspect(summary["urls"], n=10)


def decoded_image(shard_urls: str, index: int) -> Image.Image:
    import webdataset as wds

    samples = list(wds.tarfile_samples([{"url": str(u)} for u in sorted(Path(shard_urls).parent.glob("*.tar"))]))
    return Image.open(io.BytesIO(samples[index]["jpg"]))


def test_make_shards_from_folder_jsonl(tmp_path, image_folder):
    rows = [{"image": "rgb.jpg", "caption": "a blue image"}, {"file_name": "gray.png", "caption": "a gray one"},
            {"image": "rgba.png", "caption": "transparent"}, {"image": "cmyk.jpg", "captions": ["cmyk", "ink"]},
            {"image": "missing.jpg", "caption": "gone"}, {"image": "broken.jpg", "caption": "corrupt"},
            {"image": "rgb.jpg"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (image_folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    summary = make_shards(image_folder / "captions.jsonl", tmp_path / "out", "folder-jsonl", shard_size=3, progress=False)
    assert summary["samples"] == 4 and summary["shards"] == 2
    assert summary["skipped"] == {"missing_image": 1, "bad_image": 1, "missing_caption": 1, "bad_jsonl_line": 1}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: v for k, v in written.items() if k != "files"} == summary
    info = read_back(summary)
    assert info["shards"] == 2 and info["samples"] == 4 and info["errors"] == 0
    assert info["extensions"] == {"jpg": 4, "json": 4, "txt": 4}
    assert [e["__key__"] for e in info["examples"]] == [f"{i:09d}" for i in range(4)]
    assert info["examples"][3]["json"]["captions"] == ["cmyk", "ink"] and info["examples"][3]["txt"] == "cmyk"
    gray, rgba = decoded_image(summary["urls"], 1), decoded_image(summary["urls"], 2)
    assert gray.mode == rgba.mode == "RGB" and rgba.getpixel((0, 0))[1] > 240  # transparent → white


def test_make_shards_from_folder_tsv_with_header(tmp_path, image_folder):
    tsv = "file\tcaption\nrgb.jpg\ta blue image\ngray.png\tgray\nno tab here\nrgba.png\t\n"
    (image_folder / "captions.tsv").write_text(tsv)
    summary = make_shards(image_folder / "captions.tsv", tmp_path / "out", "folder-tsv", progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == {"bad_tsv_line": 1, "missing_caption": 1}
    assert [e["txt"] for e in read_back(summary)["examples"]] == ["a blue image", "gray"]


def test_make_shards_from_coco_keeps_all_captions_as_references(tmp_path, image_folder):
    coco = {"images": [{"id": 1, "file_name": "rgb.jpg"}, {"id": 2, "file_name": "gray.png"},
                       {"id": 3, "file_name": "rgba.png"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"},
                            {"image_id": 1, "caption": "uno"}]}
    annotations = tmp_path / "captions_val.json"
    annotations.write_text(json.dumps(coco))
    summary = make_shards(annotations, tmp_path / "out", "coco", image_root=image_folder, progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == {"no_captions": 1}
    first, second = read_back(summary)["examples"]
    assert first["json"]["captions"] == ["one", "uno"] and first["json"]["image_id"] == 1  # COCO ids stay integers
    assert second["json"]["captions"] == ["two"] and first["txt"] == "one"


def test_make_shards_rejects_unknown_format_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        make_shards(tmp_path / "x", tmp_path / "out", "csv", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_shards(tmp_path / "missing.jsonl", tmp_path / "out", "folder-jsonl", progress=False)


def test_inspect_counts_tar_errors_and_prints(tmp_path, image_folder):
    (image_folder / "c.jsonl").write_text(json.dumps({"image": "rgb.jpg", "caption": "x"}) + "\n")
    summary = make_shards(image_folder / "c.jsonl", tmp_path / "out", "folder-jsonl", progress=False)
    broken = tmp_path / "out" / "00001.tar"
    broken.write_bytes(b"\0" * 100)
    info = inspect([str(tmp_path / "out" / "00000.tar"), str(broken)])
    assert info["samples"] == 1 and info["errors"] == 1 and info["shards"] == 2
    console = Console(file=io.StringIO(), width=120)
    print_inspection(info, console)
    assert "1 samples in 2 shards" in console.file.getvalue() and summary["samples"] == 1
