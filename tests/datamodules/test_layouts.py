"""Released layouts read as they are: LAVIS caption lists, LAION/img2dataset parquet, OBELICS parquet with URL
images, MMC4's ``.jsonl.zip``, open_flamingo-style MMC4 shards, and images too large for the readers.

Every sample below is written in the released layout (field names, nesting, types, string-encoded JSON fields):
LAVIS ``coco_karpathy_{train,val}.json``, LAION-400M metadata parquet (``SAMPLE_ID``, ``URL``, ``TEXT``, …), an
img2dataset output folder (``{shard}.parquet`` with ``url``/``key``/``status`` beside ``{shard}/{key}.jpg`` or
``{shard}.tar``), HuggingFaceM4/OBELICS rows (``images``, ``texts``, ``metadata`` and ``general_metadata`` as JSON
strings) and allenai/mmc4 documents (``text_list``, ``image_info`` with ``image_name``/``raw_url``/
``matched_text_index``/``matched_sim``/``face_detections``, ``similarity_matrix``, ``url``).
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules import ImageTextDataModule, Source
from datamodules.formats.outputs import InputError
from datamodules.image_text import ExampleBuilder
from datamodules.interleaved import InterleavedDataModule, MixSource, document_segments
from datamodules.pipeline.skips import collecting_notes
from datamodules.tools.interleaved import convert
from datamodules.tools.make_shards import make_shards
from mmlm.app.cli import main
from mmlm.tokenizers import train_word_tokenizer

WORDS = "a an the child woman man kitchen stove umbrella yak salad cat dog picture of red blue green intro middle end"


def jpeg(colour: str, size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok")
    train_word_tokenizer([WORDS], out_dir=out)
    return str(out)


def image_text(tokenizer_dir: str, **kwargs) -> ImageTextDataModule:
    dm = ImageTextDataModule(tokenizer=tokenizer_dir, image_size=8, batch_size=8, shuffle_buffer=0, **kwargs)
    dm.setup()
    return dm


def val_batch(dm: ImageTextDataModule):
    return next(iter(dm.val_dataloader()))


# -- LAVIS caption lists --------------------------------------------------------------------------------------------


@pytest.fixture
def lavis(tmp_path: Path) -> dict[str, Path]:
    """``coco/val2014/*.jpg`` and LAVIS's ``coco_karpathy_train.json`` / ``coco_karpathy_val.json`` for them."""
    folder = tmp_path / "coco" / "val2014"
    folder.mkdir(parents=True)
    for image_id, colour in ((328757, "red"), (184613, "blue"), (403013, "green")):
        (folder / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(jpeg(colour))
    train = [{"caption": "A woman eating fresh vegetables from a bowl.", "image": "val2014/COCO_val2014_000000328757.jpg",
              "image_id": "coco_328757"},
             {"caption": "A woman eats a salad.", "image": "val2014/COCO_val2014_000000328757.jpg",
              "image_id": "coco_328757"}]
    val = [{"image": "val2014/COCO_val2014_000000184613.jpg",
            "caption": ["A child holding a flowered umbrella and petting a yak.",
                        "A young man holding an umbrella next to a herd of cattle."]},
           {"image": "val2014/COCO_val2014_000000403013.jpg", "caption": ["A kitchen with a stove."]}]
    paths = {"train": tmp_path / "coco_karpathy_train.json", "val": tmp_path / "coco_karpathy_val.json",
             "images": tmp_path / "coco"}
    paths["train"].write_text(json.dumps(train))
    paths["val"].write_text(json.dumps(val))
    return paths


def test_lavis_eval_list_is_read_raw_with_all_references_and_coco_ids(lavis, tokenizer_dir):
    batch = val_batch(image_text(tokenizer_dir, val=[Source(str(lavis["val"]), images=str(lavis["images"]))]))
    assert batch.ids == [184613, 403013]  # LAVIS's rule: the number of the COCO file name, as the COCO scorer wants
    assert batch.references == [["A child holding a flowered umbrella and petting a yak.",
                                 "A young man holding an umbrella next to a herd of cattle."], ["A kitchen with a stove."]]
    assert batch.pixels.shape == (2, 3, 8, 8)


def test_lavis_train_list_gives_one_sample_per_caption_with_its_string_id(lavis, tokenizer_dir):
    batch = val_batch(image_text(tokenizer_dir, val=[Source(str(lavis["train"]), images=str(lavis["images"]))]))
    assert batch.ids == ["coco_328757", "coco_328757"]
    assert batch.references == [["A woman eating fresh vegetables from a bowl."], ["A woman eats a salad."]]


def test_make_shards_on_lavis_lists_writes_what_the_raw_reader_reads(lavis, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "val-shards"
    assert main(["data", "make-shards", str(lavis["val"]), "--images", str(lavis["images"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert (summary["format"], summary["samples"], summary["skipped"]) == ("lavis", 2, {})
    raw = val_batch(image_text(tokenizer_dir, val=[Source(str(lavis["val"]), images=str(lavis["images"]))]))
    shards = val_batch(image_text(tokenizer_dir, val=[Source(summary["urls"])]))
    assert shards.ids == raw.ids and shards.references == raw.references and torch.equal(shards.pixels, raw.pixels)


def test_a_lavis_array_given_as_jsonl_is_read_not_one_bad_line(lavis, tmp_path):
    summary = make_shards(lavis["train"], tmp_path / "out", fmt="folder-jsonl", image_root=lavis["images"],
                          progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == {}


def test_a_caption_list_in_a_sample_json_is_the_target_and_references():
    text = ExampleBuilder(kinds=("caption",), prompts=("",), image=None).caption_text(  # type: ignore[arg-type]
        {"__key__": "k", "json": json.dumps({"caption": ["a red one.", "a crimson one."]}).encode()}, "")
    assert text["target"] == "a red one." and text["references"] == ["a red one.", "a crimson one."]


# -- LAION metadata parquet + img2dataset download folder ----------------------------------------------------------


URLS = [f"https://img.example.com/{i}.jpg" for i in range(4)]


def img2dataset_rows(keys: dict[str, str]) -> list[dict]:
    """The per-shard parquet rows img2dataset writes (``keys``: url → key of the downloaded ones)."""
    rows = []
    for n, url in enumerate(URLS[:3]):
        ok = url in keys
        rows.append({"url": url, "caption": f"picture {n}", "key": keys.get(url, f"00000{n:04d}"),
                     "status": "success" if ok else "failed_to_download",
                     "error_message": None if ok else "HTTP Error 404: Not Found",
                     "width": 16 if ok else None, "height": 12 if ok else None, "original_width": 16 if ok else None,
                     "original_height": 12 if ok else None, "exif": None, "sha256": "0" * 64 if ok else None})
    return rows


def download_folder(root: Path, output_format: str) -> Path:
    """img2dataset output for URLS[0..2] (URLS[1] failed): ``files`` or ``webdataset`` format, one shard."""
    root.mkdir(parents=True)
    keys = {URLS[0]: "000000000", URLS[2]: "000000002"}
    colours = {URLS[0]: "red", URLS[2]: "blue"}
    rows = img2dataset_rows(keys)
    if output_format == "files":
        (root / "00000").mkdir()
        for row in rows:
            if row["status"] == "success":
                (root / "00000" / f"{row['key']}.jpg").write_bytes(jpeg(colours[row["url"]]))
                (root / "00000" / f"{row['key']}.txt").write_text(row["caption"])
                (root / "00000" / f"{row['key']}.json").write_text(json.dumps(row, indent=4))
    else:
        with wds.TarWriter(str(root / "00000.tar")) as writer:
            for row in rows:
                if row["status"] == "success":
                    writer.write({"__key__": row["key"], "jpg": jpeg(colours[row["url"]]),
                                  "txt": row["caption"].encode(), "json": json.dumps(row, indent=4).encode()})
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1}))
    return root


def laion_metadata(path: Path) -> Path:
    """A LAION-400M metadata parquet: SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity."""
    rows = [{"SAMPLE_ID": 1000 + i, "URL": url, "TEXT": f"a {colour} picture", "HEIGHT": 12, "WIDTH": 16,
             "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": 0.31}
            for i, (url, colour) in enumerate(zip(URLS, ["red", "green", "blue", "black"]))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_laion_parquet_with_an_img2dataset_download(tmp_path, tokenizer_dir, output_format):
    download = download_folder(tmp_path / "download", output_format)
    meta = laion_metadata(tmp_path / "laion.parquet")
    summary = make_shards(meta, tmp_path / "shards", image_root=download, progress=False)
    assert (summary["format"], summary["samples"]) == ("parquet", 2)
    assert summary["skipped"] == {"missing_image": 2}  # 404 at download time, and a URL never tried
    shards = val_batch(image_text(tokenizer_dir, val=[Source(summary["urls"])]))
    assert shards.ids == [1000, 1002] and shards.references == [["a red picture"], ["a blue picture"]]
    raw = val_batch(image_text(tokenizer_dir, val=[Source(str(meta), images=str(download))]))
    assert raw.ids == shards.ids and torch.equal(raw.pixels, shards.pixels)


def test_the_img2dataset_parquet_itself_is_an_input(tmp_path):
    download = download_folder(tmp_path / "download", "files")
    summary = make_shards(download / "00000.parquet", tmp_path / "shards", progress=False)  # images: its own folder
    assert summary["samples"] == 2 and summary["skipped"] == {"missing_image": 1}


def test_parquet_problems_are_one_message(tmp_path, capsys):
    meta = laion_metadata(tmp_path / "laion.parquet")
    with pytest.raises(InputError, match="--images to the img2dataset download folder"):
        make_shards(meta, tmp_path / "a", progress=False)
    assert main(["data", "make-shards", str(meta), "--format", "folder-jsonl", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a parquet file, not folder-jsonl" in err  # was a UnicodeDecodeError traceback


# -- OBELICS ---------------------------------------------------------------------------------------------------------


def obelics_rows() -> list[dict]:
    """Two OBELICS documents, 6 images by URL, as the released parquet rows."""
    def image_meta(url: str) -> dict:
        return {"document_url": "https://doc.example.com/a", "unformatted_src": url, "src": url,
                "formatted_filename": Path(url).stem, "alt_text": "", "original_width": 16, "original_height": 12,
                "format": "jpeg"}

    docs = [(["intro a cat", None, "middle", None, None, "end"], [None, 0, None, 1, 2, None]),
            ([None, "a dog", None, None], [3, None, 4, 5])]
    rows = []
    for texts, images in docs:
        urls = [None if i is None else f"https://img.example.com/o{i}.jpg" for i in images]
        rows.append({"images": urls, "metadata": json.dumps([None if u is None else image_meta(u) for u in urls]),
                     "general_metadata": json.dumps({"url": "https://doc.example.com/a",
                                                     "warc_filename": "crawl-data/CC-MAIN-2023/x.warc.gz",
                                                     "warc_record_offset": 1234, "warc_record_length": 5678}),
                     "texts": texts})
    return rows


def obelics_download(root: Path, missing: int = 4) -> Path:
    """img2dataset ``webdataset`` output for the 6 OBELICS image URLs, URL ``o{missing}`` failed."""
    root.mkdir(parents=True)
    rows = []
    with wds.TarWriter(str(root / "00000.tar")) as writer:
        for i in range(6):
            key, url = f"00000{i:04d}", f"https://img.example.com/o{i}.jpg"
            ok = i != missing
            rows.append({"url": url, "key": key, "status": "success" if ok else "failed_to_download",
                         "error_message": None if ok else "timeout"})
            if ok:
                writer.write({"__key__": key, "jpg": jpeg(["red", "blue", "green", "black", "white", "gray"][i]),
                              "json": json.dumps(rows[-1]).encode()})
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    return root


@pytest.fixture(scope="module")
def synth_tokenizer(tmp_path_factory) -> str:
    from datamodules.synthetic.interleaved import write_interleaved

    return write_interleaved(tmp_path_factory.mktemp("inter"), docs=2, pairs=2, texts=2, val=1, support=1,
                             shard_size=1)["tokenizer"]


def interleaved_batch(urls: str, tokenizer: str, batch_size: int = 2):
    data = InterleavedDataModule(train=[MixSource(urls)], tokenizer=tokenizer, image_size=8, image_tokens=2,
                                 batch_size=batch_size, max_tokens=256, max_images=16, shuffle_buffer=0)
    data.setup()
    return next(iter(data.train_dataloader()))


def test_obelics_parquet_images_come_from_an_img2dataset_download(tmp_path, synth_tokenizer):
    pq.write_table(pa.Table.from_pylist(obelics_rows()), tmp_path / "obelics-00000.parquet")
    download = obelics_download(tmp_path / "images")
    summary = convert(tmp_path / "obelics-00000.parquet", tmp_path / "shards", "obelics", images=download)
    assert (summary["documents"], summary["images"], summary["images_missing"]) == (2, 5, 1)
    docs = [json.loads(s["json"]) for s in wds.WebDataset(summary["urls"], shardshuffle=False)]
    for doc in docs:
        metadata = json.loads(doc["metadata"])  # still a JSON string, aligned with texts and images
        assert len(metadata) == len(doc["texts"]) == len(doc["images"])
        assert all((m is None) == (i is None) for m, i in zip(metadata, doc["images"]))
        assert json.loads(doc["general_metadata"])["warc_record_offset"] == 1234
    srcs = [m["src"] for doc in docs for m in json.loads(doc["metadata"]) if m]
    assert srcs == [f"https://img.example.com/o{i}.jpg" for i in (0, 1, 2, 3, 5)]  # o4 failed: left out
    assert interleaved_batch(summary["urls"], synth_tokenizer).images.shape[0] == 5


def test_obelics_images_through_a_url_map(tmp_path):
    (tmp_path / "files").mkdir()
    mapping = {}
    for i in range(6):
        (tmp_path / "files" / f"{i}.jpg").write_bytes(jpeg("red"))
        mapping[f"https://img.example.com/o{i}.jpg"] = f"files/{i}.jpg"
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in obelics_rows())
    summary = convert(tmp_path / "docs.jsonl", tmp_path / "shards", "obelics", image_map=tmp_path / "map.json")
    assert (summary["images"], summary.get("images_missing", 0)) == (6, 0)


# -- MMC4 ------------------------------------------------------------------------------------------------------------


def mmc4_doc(images: list[tuple[str, str]]) -> dict:
    """An MMC4 document (``docs_shard_{i}_v2.jsonl`` line) with three sentences and ``images`` (name, url)."""
    return {"text_list": ["A red circle.", "Then a blue square.", "The end."],
            "image_info": [{"face_detections": None, "image_name": name, "matched_sim": 0.3 + i / 100,
                            "matched_text_index": i, "raw_url": url} for i, (name, url) in enumerate(images)],
            "similarity_matrix": [[0.3, 0.2, 0.1]] * len(images), "url": "https://doc.example.com/mmc4",
            "could_have_url_duplicate": 0}


def test_mmc4_jsonl_zip_as_released_keeps_a_document_with_a_missing_image(tmp_path, synth_tokenizer):
    images = tmp_path / "mmc4_images"
    images.mkdir()
    (images / "a1b2c3d4e5f6.jpg").write_bytes(jpeg("red"))
    (images / "0f9e8d7c6b5a.jpg").write_bytes(jpeg("blue"))
    doc = mmc4_doc([("a1b2c3d4e5f6.jpg", "https://x/1.jpg"), ("ffffffffffff.jpg", "https://x/2.jpg"),
                    ("0f9e8d7c6b5a.jpg", "https://x/3.jpg")])
    with zipfile.ZipFile(tmp_path / "docs_shard_0_v2.jsonl.zip", "w") as archive:
        archive.writestr("docs_shard_0_v2.jsonl", json.dumps(doc) + "\n")
    summary = convert(tmp_path / "docs_shard_0_v2.jsonl.zip", tmp_path / "shards", "mmc4", images=images)
    assert (summary["documents"], summary["images"], summary["images_missing"]) == (1, 2, 1)
    batch = interleaved_batch(summary["urls"], synth_tokenizer, batch_size=1)
    assert batch.images.shape[0] == 2 and batch.num_samples == 1


def test_open_flamingo_style_mmc4_sample_with_a_missing_image_keeps_its_text_and_other_images():
    """open_flamingo's MMC4 shards carry images as ``image_base64``; one without any image source used to drop the
    whole document."""
    doc = mmc4_doc([("a.jpg", "https://x/1.jpg"), ("b.jpg", "https://x/2.jpg"), ("c.jpg", "https://x/3.jpg")])
    for info, colour in zip(doc["image_info"], ["red", None, "blue"]):
        if colour is not None:
            info["image_base64"] = base64.b64encode(jpeg(colour)).decode()
    with collecting_notes() as notes:
        segments = document_segments({"__key__": "d", "json": json.dumps(doc).encode()})
    assert [type(s).__name__ for s in segments] == ["bytes", "str", "str", "bytes", "str"]
    assert notes.skipped == {"converted_missing_image": 1}


# -- images the readers would skip ---------------------------------------------------------------------------------


def test_make_shards_downsizes_images_the_reader_would_skip(tmp_path, tokenizer_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 200), "red").save(folder / "big.png")
    Image.new("RGB", (20, 10), "blue").save(folder / "small.png")
    (folder / "c.jsonl").write_text(json.dumps({"image": "big.png", "caption": "a red picture"}) + "\n"
                                    + json.dumps({"image": "small.png", "caption": "a blue picture"}) + "\n")
    kept = make_shards(folder / "c.jsonl", tmp_path / "kept", progress=False, max_pixels=None)
    skipped = image_text(tokenizer_dir, val=[Source(kept["urls"])], max_image_pixels=6000)
    assert len(val_batch(skipped)) == 1 and skipped.skip_counts() == {"image_too_large": 1}  # what it fixes
    summary = make_shards(folder / "c.jsonl", tmp_path / "fit", progress=False, max_pixels=6000)
    assert summary["downsized"] == 1 and summary["downsized_examples"][0]["from"] == [300, 200]
    width, height = summary["downsized_examples"][0]["to"]
    assert width * height <= 6000 and abs(width / height - 1.5) < 0.02
    dm = image_text(tokenizer_dir, val=[Source(summary["urls"])], max_image_pixels=6000)
    assert len(val_batch(dm)) == 2 and dm.skip_counts() == {}
    meta = json.loads(next(iter(wds.WebDataset(summary["urls"], shardshuffle=False)))["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (width, height, 300, 200)
