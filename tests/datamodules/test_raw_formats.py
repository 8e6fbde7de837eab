"""Raw data sets read directly (``datamodules.formats.raw``): the same samples and batches as the converted shards, for every
format; rank/worker split, skip counts and resume of raw sources; config-time checks; ``make-shards --val-fraction``;
``mmlm predict`` on a questions file + image folder (VQA) and on a plain image folder (Donut)."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from datamodules.documents import DocumentDataModule, DocumentSource
from datamodules.formats.converters import convert_gqa, convert_karpathy, convert_vqav2
from datamodules.formats.raw import RawSpec, chunked, load_index, open_url
from datamodules.image_text import ImageTextDataModule, Source
from datamodules.pipeline.streams import tar_samples
from datamodules.tools.make_shards import make_shards
from mmlm.app.cli import main
from mmlm.losses import IGNORE_INDEX
from mmlm.piece_tokenizer import train_piece_tokenizer
from mmlm.tokenizers import train_word_tokenizer

WORDS = "what is the colour of it how many are there a red green blue picture yes no two"
TENSORS = ("pixels", "input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask")


def save_image(path: Path, colour: str = "red", mode: str = "RGB", fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 10), colour if mode == "RGB" else 90).save(path, format=fmt)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok")
    train_word_tokenizer([WORDS], out_dir=out)
    return str(out)


def read(source: Source, tokenizer_dir: str, stage: str = "validate", **kwargs) -> tuple[list, dict[str, int]]:
    """All batches of one source for ``stage`` and the datamodule's skip counts."""
    name = {"validate": "val", "predict": "predict"}[stage]
    dm = ImageTextDataModule(**{name: [source]}, tokenizer=tokenizer_dir, image_size=8, batch_size=2, **kwargs)
    dm.setup(stage)
    loader = dm.val_dataloader() if stage == "validate" else dm.predict_dataloader()
    return list(loader), dm.skip_counts()


def assert_same_batches(raw: list, shards: list) -> None:
    """Equal tensors, keys, ids (with their types), references, tasks, question and answer types."""
    assert len(raw) == len(shards) > 0
    for a, b in zip(raw, shards, strict=True):
        for name in TENSORS:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (a.keys, a.ids, a.references, a.tasks, a.question_types, a.answer_types) == \
               (b.keys, b.ids, b.references, b.tasks, b.question_types, b.answer_types)
        assert [type(i) for i in a.ids] == [type(i) for i in b.ids]


def plain(sample: dict) -> dict:
    """A raw sample without webdataset's bookkeeping (``__url__``)."""
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def served_samples(source: Source) -> list[dict]:
    """The samples the chunk urls of a raw source serve, in order, without the stand-ins of skipped entries."""
    urls = chunked(source, source.raw_spec(), needed=1, chunk=3).urls
    assert len(urls) > 1 and all(u.startswith("mmlm-raw://") for u in urls)
    samples = (s for u in urls for s in tar_samples(u, open_url, wds.reraise_exception))
    return [plain(s) for s in samples if "skip" not in s]


def test_raw_chunks_are_opened_by_the_datamodules_opener_not_a_global_scheme():
    """``mmlm-raw://`` is served by the opener the datamodule passes to its pipelines (``open_url``); importing the
    raw readers registers nothing in webdataset's global scheme table."""
    from webdataset.gopen import gopen_schemes

    assert "mmlm-raw" not in gopen_schemes
    assert ImageTextDataModule().opener() is open_url


def shard_samples(urls: str) -> list[dict]:
    shards = sorted(Path(urls).parent.glob("*.tar"))
    return [plain(s) for s in wds.tarfile_samples([{"url": str(s)} for s in shards])]


def keys_of(items) -> list[str]:
    return [k for item in items if item.batch is not None for k in item.batch.keys]


# -- VQAv2 / OK-VQA ---------------------------------------------------------------------------------


def vqa_files(root: Path, subtype: str = "val2014", annotated: bool = True) -> dict[str, Path]:
    """VQAv2 files: images 1 (RGB JPEG), 2 (PNG bytes under a .jpg name: re-encoded), 3 (grayscale JPEG), 4 missing;
    two questions per image (ids ``image_id * 1000 + n``), question 2001 without annotation."""
    split = subtype.replace("test-dev", "test")
    images = root / split
    save_image(images / f"COCO_{split}_{1:012d}.jpg", "red")
    save_image(images / f"COCO_{split}_{2:012d}.jpg", "green", fmt="PNG")
    save_image(images / f"COCO_{split}_{3:012d}.jpg", mode="L")
    questions = [{"image_id": i, "question": q, "question_id": i * 1000 + n}
                 for i in (1, 2, 3, 4) for n, q in enumerate(["What is the colour of it?", "How many are there?"])]
    files = {"images": images, "questions": write_json(root / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                                                       {"data_subtype": subtype, "questions": questions})}
    if annotated:
        rows = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": ["what is the", "how many"][n],
                 "answer_type": ["other", "number"][n],
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                             for k, a in enumerate([["red"] * 8 + ["blue"] * 2, ["two"] * 10][n])]}
                for q in questions for n in [q["question_id"] % 1000] if q["question_id"] != 2001]
        files["annotations"] = write_json(root / f"v2_mscoco_{subtype}_annotations.json", {"annotations": rows})
    return files


def test_vqav2_read_raw_gives_the_samples_and_batches_of_the_converted_shards(tmp_path, tokenizer_dir):
    files = vqa_files(tmp_path)
    summary = convert_vqav2(files["questions"], files["annotations"], files["images"], tmp_path / "shards",
                            shard_size=2, progress=False)
    raw = Source(str(files["questions"]), kind="vqa", annotations=str(files["annotations"]), images=str(files["images"]))
    assert served_samples(raw) == shard_samples(summary["urls"])  # same keys, jpg bytes and json members
    raw_batches, raw_skips = read(raw, tokenizer_dir)
    shard_batches, shard_skips = read(Source(summary["urls"], kind="vqa"), tokenizer_dir)
    assert_same_batches(raw_batches, shard_batches)
    ids = [i for b in raw_batches for i in b.ids]
    assert ids == [1000, 1001, 2000, 3000, 3001] and all(type(i) is int for i in ids)
    assert [t for b in raw_batches for t in b.answer_types] == ["other", "number", "other", "other", "number"]
    assert raw_batches[0].references[0] == ["red"] * 8 + ["blue"] * 2 and raw_batches[0].tasks == ["vqa", "vqa"]
    # what the converter leaves out is counted under the converter's reasons when read raw
    assert raw_skips == summary["skipped"] == {"missing_annotation": 1, "missing_image": 2} and shard_skips == {}


def test_vqa_questions_without_annotations_are_predicted_not_validated(tmp_path, tokenizer_dir):
    files = vqa_files(tmp_path, "test-dev2015", annotated=False)  # test-dev uses the test2015 images
    source = Source(str(files["questions"]), kind="vqa", images=str(files["images"]))
    batches, skips = read(source, tokenizer_dir)
    assert batches == [] and skips == {"missing_answers": 6, "missing_image": 2}
    batches, skips = read(source, tokenizer_dir, stage="predict")
    assert [i for b in batches for i in b.ids] == [1000, 1001, 2000, 2001, 3000, 3001]
    assert all(r == [] for b in batches for r in b.references) and skips == {"missing_image": 2}


def test_okvqa_with_coco_2017_names_and_gqa_read_raw_equal_their_shards(tmp_path, tokenizer_dir):
    images = tmp_path / "val2017"
    for image_id in (7, 8):
        save_image(images / f"{image_id:012d}.jpg", "blue")
    questions = write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": "How many are there?", "question_id": i * 10} for i in (7, 8)]})
    annotations = write_json(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": i * 10, "question_type": "eight", "answer_type": "other",
         "answers": [{"answer": a} for a in ["two", "2"] * 5]} for i in (7, 8)]})
    pattern = "{image_id:012d}.jpg"
    summary = convert_vqav2(questions, annotations, images, tmp_path / "okvqa", image_pattern=pattern, progress=False)
    raw = Source(str(questions), kind="vqa", annotations=str(annotations), images=str(images), image_pattern=pattern)
    assert_same_batches(read(raw, tokenizer_dir)[0], read(Source(summary["urls"], kind="vqa"), tokenizer_dir)[0])

    save_image(tmp_path / "gqa" / "n1.jpg")
    gqa = {str(q): {"imageId": "n1", "question": "Is it red?", "answer": a, "types": {"structural": "verify"}}
           for q, a in ((201, "yes"), (202, "no"))}
    path = write_json(tmp_path / "testdev_balanced_questions.json", gqa)
    summary = convert_gqa(path, tmp_path / "gqa", tmp_path / "gqa_shards", progress=False)
    raw_batches, _ = read(Source(str(path), kind="gqa", images=str(tmp_path / "gqa")), tokenizer_dir)
    assert_same_batches(raw_batches, read(Source(summary["urls"], kind="gqa"), tokenizer_dir)[0])
    assert raw_batches[0].ids == ["201", "202"] and raw_batches[0].tasks == ["gqa", "gqa"]


# -- captions: Karpathy, COCO, jsonl, tsv -----------------------------------------------------------


@pytest.fixture
def karpathy(tmp_path) -> dict[str, Path]:
    """``dataset_coco.json``: test images (one missing, one without sentences), val, train and restval."""
    root = tmp_path / "coco"
    entries = [("val2014", 391895, "test", ["A red picture.", "Red again."]), ("val2014", 522418, "test", ["A blue one."]),
               ("val2014", 184613, "val", ["A green picture."]), ("train2014", 318556, "train", ["Two red ones."]),
               ("val2014", 116100, "restval", ["A picture."]), ("val2014", 999999, "test", ["Gone."]),
               ("val2014", 888888, "test", [])]
    images = []
    for imgid, (folder, cocoid, split, captions) in enumerate(entries):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        if cocoid != 999999:
            save_image(root / folder / name, ["red", "blue", "green"][imgid % 3])
        images.append({"filepath": folder, "filename": name, "imgid": imgid, "split": split, "cocoid": cocoid,
                       "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions]})
    return {"json": write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"}), "root": root}


@pytest.mark.parametrize("split", ["test", "train", ["val", "restval"]])
def test_karpathy_split_file_read_raw_equals_its_converted_shards(tmp_path, tokenizer_dir, karpathy, split):
    summary = convert_karpathy(karpathy["json"], karpathy["root"], tmp_path / "shards", split=split, progress=False)
    raw = Source(str(karpathy["json"]), kind="caption", images=str(karpathy["root"]), split=split)
    raw_batches, skips = read(raw, tokenizer_dir)
    assert_same_batches(raw_batches, read(Source(summary["urls"]), tokenizer_dir)[0])
    assert skips == summary["skipped"]
    if split == "test":
        assert served_samples(raw) == shard_samples(summary["urls"])
        assert raw_batches[0].ids == [391895, 522418] and raw_batches[0].tasks == ["caption"] * 2
        assert raw_batches[0].references[0] == ["A red picture.", "Red again."]
        assert skips == {"missing_image": 1, "no_captions": 1}


def caption_folder(root: Path) -> Path:
    """Images of every mode (RGB, grayscale PNG, RGBA PNG, CMYK JPEG) plus a broken file."""
    save_image(root / "rgb.jpg", "red")
    save_image(root / "gray.png", mode="L", fmt="PNG")
    Image.new("RGBA", (10, 8), (255, 0, 0, 0)).save(root / "rgba.png")
    Image.new("CMYK", (10, 8), (0, 0, 0, 0)).save(root / "cmyk.jpg")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def test_coco_captions_json_read_raw_equals_make_shards(tmp_path, tokenizer_dir):
    images = caption_folder(tmp_path / "val2014")
    coco = {"info": {}, "images": [{"id": 11, "file_name": "rgb.jpg"}, {"id": 12, "file_name": "gray.png"},
                                   {"id": 13, "file_name": "rgba.png"}, {"id": 14, "file_name": "broken.jpg"}],
            "annotations": [{"image_id": 11, "caption": "a red one"}, {"image_id": 12, "caption": "a gray one"},
                            {"image_id": 11, "caption": "red"}, {"image_id": 14, "caption": "broken"}]}
    path = write_json(tmp_path / "captions_val2014.json", coco)
    summary = make_shards(path, tmp_path / "shards", "coco", image_root=images, progress=False, shard_size=1)
    raw = Source(str(path), kind="caption", images=str(images))
    assert served_samples(raw) == shard_samples(summary["urls"])
    raw_batches, skips = read(raw, tokenizer_dir)
    assert_same_batches(raw_batches, read(Source(summary["urls"]), tokenizer_dir)[0])
    assert raw_batches[0].ids == [11, 12] and raw_batches[0].references[0] == ["a red one", "red"]
    assert skips == summary["skipped"] == {"no_captions": 1, "bad_image": 1}


@pytest.mark.parametrize("fmt", ["folder-jsonl", "folder-tsv"])
def test_captions_jsonl_and_tsv_read_raw_equal_make_shards(tmp_path, tokenizer_dir, fmt):
    folder = caption_folder(tmp_path / "imgs")
    rows = [("rgb.jpg", "a red one"), ("gray.png", "gray"), ("rgba.png", "clear"), ("cmyk.jpg", "ink"),
            ("missing.jpg", "gone"), ("broken.jpg", "bad")]
    if fmt == "folder-jsonl":
        path = folder / "captions.jsonl"
        path.write_text("\n".join([json.dumps({"image": n, "caption": c}) for n, c in rows] + ["{bad"]) + "\n")
    else:
        path = folder / "captions.tsv"
        path.write_text("file\tcaption\n" + "".join(f"{n}\t{c}\n" for n, c in rows) + "no tab\n")
    summary = make_shards(path, tmp_path / "shards", fmt, progress=False, shard_size=2)
    raw = Source(str(path), kind="caption")  # images default to the file's folder, as make-shards
    assert served_samples(raw) == shard_samples(summary["urls"])
    raw_batches, skips = read(raw, tokenizer_dir)
    assert_same_batches(raw_batches, read(Source(summary["urls"]), tokenizer_dir)[0])
    assert [i for b in raw_batches for i in b.ids] == ["rgb", "gray", "rgba", "cmyk"]  # file stems
    assert skips == summary["skipped"] and skips["missing_image"] == 1 and skips["bad_image"] == 1


# -- the pipeline: ranks, workers, skips, resume ----------------------------------------------------


@pytest.fixture
def jsonl_source(tmp_path) -> Source:
    """20 images with one caption each, image 13 missing."""
    lines = []
    for i in range(20):
        if i != 13:
            save_image(tmp_path / "imgs" / f"{i:02d}.jpg", ["red", "green", "blue"][i % 3])
        lines.append(json.dumps({"image": f"{i:02d}.jpg", "caption": "a red picture", "image_id": i}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return Source(str(tmp_path / "captions.jsonl"), images=str(tmp_path / "imgs"))


def test_raw_source_is_split_across_ranks_and_workers(tokenizer_dir, jsonl_source):
    dm = ImageTextDataModule(tokenizer=tokenizer_dir, image_size=8, batch_size=2, num_workers=2, raw_chunk=3,
                             epoch_samples=16, shuffle_buffer=0)
    dm.setup()
    parts = [keys_of(dm.build_pipeline("validate", [jsonl_source], rank=r, world_size=2).iter_worker(w, 2))
             for r in range(2) for w in range(2)]
    assert all(parts) and sorted(k for p in parts for k in p) == [f"{i:09d}" for i in range(20) if i != 13]
    pipes = [dm.build_pipeline("fit", [jsonl_source], rank=r, world_size=2) for r in range(2)]
    chunks = [p._pass_shards(0, w, 2, rep=0) for p in pipes for w in range(2)]
    flat = [u for part in chunks for u in part]
    assert len(flat) == len(set(flat)) == 7 and all(chunks)  # ceil(20 / 3) chunks, each read by one rank and worker
    served = {u: [s["__key__"] for s in tar_samples(u, open_url, wds.reraise_exception)] for u in flat}
    rank0 = {k for part in chunks[:2] for u in part for k in served[u]}
    assert set(keys_of(pipes[0].iter_worker(0, 2))) | set(keys_of(pipes[0].iter_worker(1, 2))) <= rank0
    assert [len(list(p.iter_worker(w, 2))) for p in pipes for w in range(2)] == [2, 2, 2, 2]  # 16 // (2 × 2) each


def test_a_missing_image_of_a_raw_source_is_counted_with_workers(tokenizer_dir, jsonl_source):
    batches, skips = read(jsonl_source, tokenizer_dir, num_workers=2, raw_chunk=4)
    assert sum(len(b) for b in batches) == 19 and skips == {"missing_image": 1}


def test_raw_source_resumes_exactly_after_a_position(tokenizer_dir, jsonl_source):
    dm = ImageTextDataModule(train=[jsonl_source], tokenizer=tokenizer_dir, image_size=8, batch_size=2,
                             raw_chunk=3, epoch_samples=40, shuffle_buffer=4)
    dm.setup()
    pipe = dm.build_pipeline("fit", [jsonl_source])
    items = list(pipe.iter_worker(0, 1))
    assert len(keys_of(items)) == 40 and sum(i.skipped.get("missing_image", 0) for i in items) >= 2  # passes 1, 2, 3
    for k in (2, 9, 15):  # inside the first pass, in the second, in the third
        resumed = [i.batch for i in pipe.iter_worker(0, 1, items[k].position) if i.batch is not None]
        expected = [i.batch for i in items[k + 1:] if i.batch is not None]
        assert [b.keys for b in resumed] == [b.keys for b in expected] and len(expected) == 19 - k
        assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(resumed, expected, strict=True))


def test_index_is_read_once_per_process(jsonl_source, monkeypatch):
    import datamodules.formats.raw as raw

    spec = jsonl_source.raw_spec()
    calls = []
    monkeypatch.setattr(raw, "open_index", lambda s: calls.append(s) or raw.RecordIndex("folder-jsonl", [], Path()))
    raw._cached_index.cache_clear()
    load_index(spec), load_index(spec), load_index(RawSpec.parse(spec.url(0, 5))[0])  # as a worker rebuilds it
    assert calls == [spec]
    Path(spec.path).write_text(Path(spec.path).read_text() + "\n")  # a changed file is read again
    load_index(spec)
    assert len(calls) == 2
    raw._cached_index.cache_clear()


# -- formats, kinds and fields: refused with the file or field named --------------------------------


def test_formats_are_inferred_or_named_and_mismatches_refused(tmp_path, tokenizer_dir, karpathy):
    files = vqa_files(tmp_path / "vqa")
    as_annotations = Source(str(files["annotations"]), kind="vqa", images=str(files["images"]))
    with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations.json.*unknown layout.*goes under annotations"):
        read(as_annotations, tokenizer_dir)
    with pytest.raises(ValueError, match=r"dataset_coco.json' is a karpathy file, which kind 'vqa' cannot read"):
        read(Source(str(karpathy["json"]), kind="vqa", images=str(karpathy["root"])), tokenizer_dir)
    with pytest.raises(ValueError, match=r"questions.json' is a vqav2 file, not coco"):
        read(Source(str(files["questions"]), format="coco", images=str(files["images"])), tokenizer_dir)
    with pytest.raises(ValueError, match=r"is a vqav2 file: set images"):
        read(Source(str(files["questions"]), kind="vqa"), tokenizer_dir)
    with pytest.raises(ValueError, match=r"karpathy file, which takes no annotations"):
        read(Source(str(karpathy["json"]), images=str(karpathy["root"]), annotations=str(files["annotations"])),
             tokenizer_dir)
    weird = write_json(tmp_path / "other.json", {"rows": []})
    with pytest.raises(ValueError, match=r"other.json' has an unknown layout .*'rows'.*expected a VQAv2"):
        read(Source(str(weird), images=str(tmp_path)), tokenizer_dir)
    with pytest.raises(ValueError, match="Source field 'images' is for raw files"):
        Source("data/{00000..00003}.tar", images="imgs/")
    with pytest.raises(ValueError, match="Source format 'xml' is not one of"):
        Source("captions.xml", format="xml")
    with pytest.raises(ValueError, match="kind 'caption' cannot read"):
        Source("q.json", format="vqav2")
    tsv = tmp_path / "captions.txt"  # another extension, named explicitly
    save_image(tmp_path / "a.jpg")
    tsv.write_text("a.jpg\ta red picture\n")
    batches, _ = read(Source(str(tsv), format="folder-tsv"), tokenizer_dir)
    assert batches[0].references == [["a red picture"]]


def validate_error(args: list[str], capsys, data: str = "datamodules.ImageTextDataModule") -> str:
    """``mmlm validate`` expecting the parser's exit code 2 before anything is built; returns stderr."""
    with pytest.raises(SystemExit) as info:
        main(["validate", "--model=resume_probe.KeyModel", f"--data={data}", "--trainer.accelerator=cpu", *args])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_missing_raw_paths_are_refused_at_config_time_naming_key_and_path(tmp_path, capsys, monkeypatch):
    import resume_probe

    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was built before the config error was reported")

    monkeypatch.setattr(resume_probe.KeyModel, "__init__", refuse)
    files = vqa_files(tmp_path)
    source = {"urls": str(files["questions"]), "kind": "vqa", "annotations": str(files["annotations"]),
              "images": str(files["images"])}
    for field, value, expected in (("annotations", str(tmp_path / "nope_annotations.json"), "no such file"),
                                   ("images", str(tmp_path / "val2015"), "no such folder"),
                                   ("urls", str(tmp_path / "nope_questions.json"), "no such file")):
        err = validate_error([f"--data.init_args.val={json.dumps([{**source, field: value}])}"], capsys)
        assert f"data.init_args.val[0].{field}={value!r}: {expected}" in err
    err = validate_error([f"--data.init_args.predict_path={tmp_path / 'scans'}"], capsys,
                         data="datamodules.DocumentDataModule")
    assert "data.init_args.predict_path=" in err and "scans" in err and "no such folder" in err
    (tmp_path / "empty").mkdir()
    err = validate_error([f"--data.init_args.predict_path={tmp_path / 'empty'}"], capsys,
                         data="datamodules.DocumentDataModule")
    assert "holds no metadata.jsonl, no images and no *.tar shards" in err


# -- make-shards --val-fraction ---------------------------------------------------------------------


def shard_file_names(folder: Path) -> list[str]:
    samples = wds.tarfile_samples([{"url": str(p)} for p in sorted(folder.glob("*.tar"))])
    return [json.loads(s["json"])["file_name"] for s in samples]


def test_make_shards_val_fraction_is_deterministic_and_disjoint_by_image(tmp_path, capsys):
    lines = []
    for i in range(40):
        save_image(tmp_path / "imgs" / f"img{i:03d}.jpg", ["red", "green", "blue"][i % 3])
        lines += [json.dumps({"image": f"img{i:03d}.jpg", "caption": f"picture {i}"})]
    lines += [json.dumps({"image": f"img{i:03d}.jpg", "caption": "again"}) for i in range(0, 40, 4)]  # 2nd captions
    (tmp_path / "imgs" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["data", "make-shards", str(tmp_path / "imgs" / "captions.jsonl"), "--out", str(out),
                     "--format", "folder-jsonl", "--shard-size", "8", "--val-fraction", "0.25"]) == 0
        printed = capsys.readouterr().out
        runs.append({split: shard_file_names(out / split) for split in ("train", "val")})
        summary = json.loads(printed[printed.index("{"):])
        written = json.loads((out / "summary.json").read_text())
        assert summary == {k: v for k, v in written.items() if k != "files"} and summary["val_fraction"] == 0.25
        for split in ("train", "val"):
            written = json.loads((out / split / "summary.json").read_text())
            assert {k: v for k, v in written.items() if k != "files"} == summary[split]
            assert summary[split]["samples"] == len(runs[-1][split])
    assert runs[0] == runs[1]  # the same images in val on every run, byte-identical shards
    for a, b in zip(sorted((tmp_path / "a" / "val").glob("*.tar")), sorted((tmp_path / "b" / "val").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    train, val = set(runs[0]["train"]), set(runs[0]["val"])
    assert not train & val and len(train | val) == 40 and 4 <= len(val) <= 18
    assert len(runs[0]["train"]) + len(runs[0]["val"]) == 50  # an image's every caption stays in its split


# -- predict on plain folders through the CLI -------------------------------------------------------


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
           "enable_model_summary": False}


def test_predict_vqa_on_a_questions_file_and_image_folder_through_the_cli(tmp_path, shapes_data, tiny_gpt2,
                                                                          tiny_resnet):
    files = vqa_files(tmp_path, "test-dev2015", annotated=False)
    config = {"trainer": {**TRAINER, "default_root_dir": str(tmp_path / "run")},
              "model": {"class_path": "mmlm.models.Frozen", "init_args": {
                  "tokenizer": str(shapes_data / "tokenizer"), "predictions_dir": str(tmp_path / "out"),
                  "generation": {"max_new_tokens": 2},
                  "encoder": {"class_path": "mmlm.encoders.TimmEncoder",
                              "init_args": {"name": "resnet10t", "img_size": 32, "model_kwargs": tiny_resnet}},
                  "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": {"config": tiny_gpt2}}}},
              "data": {"class_path": "datamodules.ImageTextDataModule", "init_args": {
                  "predict": [{"urls": str(files["questions"]), "kind": "vqa", "images": str(files["images"])}],
                  "batch_size": 4}}}
    assert main(["predict", "--config", write_config(tmp_path / "vqa.yaml", config)]) == 0
    rows = json.loads((tmp_path / "out" / "predictions" / "predict-vqa-step0.json").read_text())
    assert [r["question_id"] for r in rows] == [1000, 1001, 2000, 2001, 3000, 3001]  # integer ids, official format
    assert all(set(r) == {"question_id", "answer"} for r in rows)


@pytest.fixture(scope="module")
def piece_tokenizer(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("piece")
    train_piece_tokenizer(["Total 12.50", "Latte 3.50", "Bagel 2.25 Cash"] * 4, out, vocab_size=50)
    return str(out)


def scans(folder: Path) -> Path:
    """A plain folder of document images (no metadata.jsonl) plus files that are not images."""
    for name, colour in (("b_scan.png", "white"), ("a_scan.jpg", "gray"), ("c_scan.JPEG", "white")):
        save_image(folder / name, colour, fmt="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_donut_reads_a_plain_image_folder_for_prediction(tmp_path, piece_tokenizer):
    folder = scans(tmp_path / "scans")
    assert DocumentSource(str(folder)).layout == "image-folder"
    dm = DocumentDataModule(predict_path=str(folder), task="cord-v2", tokenizer=piece_tokenizer, image_size=(16, 24),
                            batch_size=4)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert batch.ids == ["a_scan.jpg", "b_scan.png", "c_scan.JPEG"] and batch.references == [[], [], []]
    task = dm.tokenizer.convert_tokens_to_ids("<s_cord-v2>")
    assert batch.prompt_ids[:, -1].tolist() == [task] * 3 and batch.prompt_mask.sum(1).tolist() == [1] * 3
    assert batch.labels[batch.labels != IGNORE_INDEX].tolist() == [dm.tokenizer.eos_token_id] * 3
    assert batch.pixels.shape == (3, 3, 16, 24) and dm.skipped == {}
    validation = DocumentDataModule(val_path=str(folder), tokenizer=piece_tokenizer, image_size=(16, 24))
    validation.setup("validate")
    assert list(validation.val_dataloader()) == [] and validation.skipped == {"bad_ground_truth": 3}


def test_predict_donut_on_a_plain_image_folder_through_the_cli(tmp_path, piece_tokenizer):
    folder = scans(tmp_path / "scans")
    swin = {"image_size": [32, 32], "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2],
            "window_size": 4, "drop_path_rate": 0.0}
    mbart = {"model_type": "mbart", "d_model": 32, "decoder_layers": 1, "encoder_layers": 1,
             "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
             "scale_embedding": True, "add_final_layer_norm": True, "vocab_size": 60, "pad_token_id": 1,
             "bos_token_id": 0, "eos_token_id": 2, "dropout": 0.0, "forced_eos_token_id": None}
    config = {"trainer": {**TRAINER, "default_root_dir": str(tmp_path / "run")},
              "model": {"class_path": "mmlm.models.Donut", "init_args": {
                  "tokenizer": piece_tokenizer, "predictions_dir": str(tmp_path / "out"),
                  "generation": {"max_new_tokens": 3},
                  "encoder": {"class_path": "mmlm.encoders.HFVisionEncoder",
                              "init_args": {"model_type": "donut-swin", "config": swin}},
                  "decoder": {"class_path": "mmlm.language.CrossAttentionLM",
                              "init_args": {"config": mbart}}}},
              "data": {"class_path": "datamodules.DocumentDataModule",
                       "init_args": {"predict_path": str(folder), "task": "cord-v2", "batch_size": 2}}}
    assert main(["predict", "--config", write_config(tmp_path / "donut.yaml", config)]) == 0
    stem = tmp_path / "out" / "predictions" / "predict-documents-step0"
    rows = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a_scan.jpg", "b_scan.png", "c_scan.JPEG"]  # every image, sorted by name
    assert all("prediction" in r for r in rows)


def test_image_folder_samples_keep_the_image_bytes(tmp_path):
    folder = scans(tmp_path / "scans")
    index = load_index(RawSpec("image-folder", str(folder.resolve())))
    samples = list(index.samples(0, len(index)))
    assert [json.loads(s["json"])["file_name"] for s in samples] == ["a_scan.jpg", "b_scan.png", "c_scan.JPEG"]
    assert samples[1]["png"] == (folder / "b_scan.png").read_bytes()
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (12, 10)


# -- the documentation's examples are tested code ---------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
RAW_DOCS = (ROOT / "docs" / "data-formats.md").read_text().split("## Raw data sets, read directly", 1)[1]
RAW_DOCS = RAW_DOCS.split("\n## ", 1)[0]


def doc_sources(init_args: dict) -> list:
    """The typed sources of a data module's ``init_args`` (lists of source dicts and ``*_path`` shorthands)."""
    found = []
    for stage in ("train", "val", "test", "predict"):
        for entry in init_args.get(stage) or []:
            found.append(DocumentSource(**entry) if "path" in entry else Source(**entry))
        if init_args.get(f"{stage}_path") is not None:
            found.append(DocumentSource(init_args[f"{stage}_path"], task=init_args.get("task", "cord-v2")))
    return found


def test_every_raw_yaml_example_of_the_docs_builds_typed_sources():
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", RAW_DOCS, flags=re.S)]
    sources = [s for b in blocks for s in doc_sources(b["data"]["init_args"] if "data" in b else b)]
    assert len(sources) == 12
    assert {s.raw_spec().format for s in sources if isinstance(s, Source)} == {"auto", "folder-tsv"}
    assert all(s.raw for s in sources if isinstance(s, Source))


def test_every_raw_command_of_the_docs_parses_through_the_cli(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = [line for block in re.findall(r"```bash\n(.*?)```", RAW_DOCS, flags=re.S)
                for line in block.splitlines() if line.startswith("mmlm ")]
    assert len(commands) == 4
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([*shlex.split(command)[1:], "--print_config"])
        assert info.value.code in (0, None), command
        init_args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
        assert doc_sources(init_args), command


def test_the_make_shards_command_of_the_docs_parses():
    from mmlm.app.data import data_parser

    docs = (ROOT / "docs" / "data-formats.md").read_text()
    (command,) = [line for line in docs.splitlines() if line.startswith("mmlm data make-shards")]
    args = data_parser().parse_args(shlex.split(command)[2:])
    assert args.val_fraction == 0.05 and args.format == "folder-jsonl"
    joined = docs.replace("\\\n", " ")  # continuation lines
    for line in [line for line in joined.splitlines() if line.startswith("mmlm data ")]:  # every data command
        words = shlex.split(line, comments=True)
        assert data_parser().parse_args(words[2:]).tool == words[2], line
