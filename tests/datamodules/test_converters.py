"""Converters from official public data set files (VQAv2, OK-VQA, GQA, Karpathy) to shards.

Each test writes a tiny fake copy of the official layout (a few PIL images + JSON structured as the
released files) and reads the shards back through ``inspect`` and ``ImageTextDataModule``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from datamodules.formats.converters import convert_gqa, convert_karpathy, convert_vqav2
from datamodules.image_text import ImageTextDataModule, Source
from datamodules.tools.make_shards import inspect
from mmlm.app.cli import main
from mmlm.metrics.vqa import vqa_accuracy
from mmlm.tokenizers import train_word_tokenizer

WORDS = "what is the colour of it how many are there a red green blue picture yes no two"


def save_jpeg(path: Path, colour: str = "red", mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 10), colour if mode == "RGB" else 90).save(path, format="JPEG")
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


def read_batches(urls: str, kind: str, tokenizer_dir: str) -> tuple[list, dict[str, int]]:
    """All validation batches of ``urls`` read as ``kind`` and the datamodule's skip counts."""
    dm = ImageTextDataModule(val=[Source(urls, kind=kind)], tokenizer=tokenizer_dir, image_size=8, batch_size=2)
    dm.setup()
    batches = list(dm.val_dataloader())
    return batches, dm.skip_counts()


def raw_samples(urls: str) -> list[dict]:
    shards = sorted(Path(urls).parent.glob("*.tar"))
    return list(wds.tarfile_samples([{"url": str(s)} for s in shards]))


# -- VQAv2 / OK-VQA -------------------------------------------------------------------------------


def vqa_questions(subtype: str, image_ids: list[int]) -> dict:
    """An official-shaped questions file: two questions per image, ids ``image_id * 1000 + n``."""
    questions = [{"image_id": i, "question": q, "question_id": i * 1000 + n}
                 for i in image_ids for n, q in enumerate(["What is the colour of it?", "How many are there?"])]
    return {"info": {"description": "fake"}, "task_type": "Open-Ended", "data_type": "mscoco",
            "license": {"name": "fake"}, "data_subtype": subtype, "questions": questions}


def vqa_annotations(questions: dict, answers_of=lambda qid: ["red"] * 7 + ["blue"] * 2 + ["dark red"]) -> dict:
    """An official-shaped annotations file with 10 ``{answer, answer_confidence, answer_id}`` per question."""
    rows = [{"question_type": "what is the", "multiple_choice_answer": "red", "image_id": q["image_id"],
             "answer_type": "other", "question_id": q["question_id"],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                         for k, a in enumerate(answers_of(q["question_id"]))]}
            for q in questions["questions"]]
    return {"info": {}, "license": {}, "data_subtype": questions["data_subtype"], "annotations": rows}


@pytest.fixture
def vqav2(tmp_path) -> dict[str, Path]:
    """VQAv2 val2014: images 1, 2, 3 present (3 is grayscale), 4 missing; question 2001 unannotated."""
    images = tmp_path / "val2014"
    for image_id, colour in [(1, "red"), (2, "green")]:
        save_jpeg(images / f"COCO_val2014_{image_id:012d}.jpg", colour)
    save_jpeg(images / f"COCO_val2014_{3:012d}.jpg", mode="L")
    questions = vqa_questions("val2014", [1, 2, 3, 4])
    annotations = vqa_annotations(questions)
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] != 2001]
    return {"questions": write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            "annotations": write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations),
            "images": images}


def test_convert_vqav2_val_writes_questions_with_ten_answers(tmp_path, vqav2, tokenizer_dir):
    out = tmp_path / "shards"
    summary = convert_vqav2(vqav2["questions"], vqav2["annotations"], vqav2["images"], out, shard_size=2,
                            progress=False)
    assert summary["split"] == "val2014" and summary["items"] == 8
    assert summary["samples"] == 5 and summary["shards"] == 3
    assert summary["skipped"] == {"missing_annotation": 1, "missing_image": 2}
    written = json.loads((out / "summary.json").read_text())
    assert written.pop("files") == ["00000.tar", "00001.tar", "00002.tar"] and written == summary
    info = inspect(summary["urls"], n=5)
    assert info["samples"] == 5 and info["errors"] == 0 and info["extensions"] == {"jpg": 5, "json": 5}
    metas = [e["json"] for e in info["examples"]]
    assert [m["question_id"] for m in metas] == [1000, 1001, 2000, 3000, 3001]
    assert [m["image_id"] for m in metas] == [1, 1, 2, 3, 3]
    # keys are the questions' positions in the file: the skipped question 2001 (position 3) leaves a gap
    assert [e["__key__"] for e in info["examples"]] == [f"{i:09d}" for i in (0, 1, 2, 4, 5)]
    assert all(len(m["answers"]) == 10 and all(isinstance(a, str) for a in m["answers"]) for m in metas)
    assert metas[0]["question_type"] == "what is the" and metas[0]["answer_type"] == "other"
    gray = vqav2["images"] / f"COCO_val2014_{3:012d}.jpg"
    assert raw_samples(summary["urls"])[3]["jpg"] == gray.read_bytes()  # original bytes, even grayscale

    batches, skipped = read_batches(summary["urls"], "vqa", tokenizer_dir)
    assert skipped == {}
    assert [i for b in batches for i in b.ids] == [1000, 1001, 2000, 3000, 3001]  # integer ids, as the official files
    assert all(len(r) == 10 for b in batches for r in b.references)
    assert batches[0].tasks == ["vqa", "vqa"] and batches[0].pixels.shape == (2, 3, 8, 8)


def test_convert_vqav2_test_dev_has_no_answers_and_uses_test_images(tmp_path, tokenizer_dir):
    images = tmp_path / "test2015"
    for image_id in (5, 6):
        save_jpeg(images / f"COCO_test2015_{image_id:012d}.jpg")
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                           vqa_questions("test-dev2015", [5, 6]))
    summary = convert_vqav2(questions, None, images, tmp_path / "out", progress=False)
    assert summary["split"] == "test2015" and summary["samples"] == 4 and summary["skipped"] == {}
    metas = [e["json"] for e in inspect(summary["urls"], n=4)["examples"]]
    assert [m["answers"] for m in metas] == [[]] * 4 and [m["question_id"] for m in metas] == [5000, 5001, 6000, 6001]
    # Validation needs answers: unanswered samples are skipped and counted (see docs) ...
    batches, skipped = read_batches(summary["urls"], "vqa", tokenizer_dir)
    assert batches == [] and skipped == {"missing_answers": 4}
    # ... while prediction (test-dev submissions) reads every question.
    dm = ImageTextDataModule(predict=[Source(summary["urls"], kind="vqa")], tokenizer=tokenizer_dir,
                             image_size=8, batch_size=4)
    dm.setup()
    (batch,) = list(dm.predict_dataloader())
    assert batch.ids == [5000, 5001, 6000, 6001] and batch.references == [[]] * 4
    assert dm.skip_counts() == {}


def test_convert_vqav2_reads_ok_vqa_files_with_coco_2017_names(tmp_path, tokenizer_dir):
    images = tmp_path / "val2017"
    for image_id in (7, 8, 9):
        save_jpeg(images / f"{image_id:012d}.jpg", "blue")
    questions = vqa_questions("val2014", [7, 8, 9])
    questions["questions"] = questions["questions"][::2]  # OK-VQA: one question per image

    def answers(qid: int) -> list[str]:  # OK-VQA: 5 annotators, each answer listed twice
        return [a for a in ["two", "2", "two", "pair", "two"] for _ in range(2)]

    annotations = vqa_annotations(questions, answers)
    for row in annotations["annotations"]:
        row.update(question_type="eight", confidence=3)
        for answer in row["answers"]:
            answer["raw_answer"] = answer["answer"]
    q = write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", questions)
    a = write_json(tmp_path / "mscoco_val2014_annotations.json", annotations)
    summary = convert_vqav2(q, a, images, tmp_path / "out", image_pattern="{image_id:012d}.jpg", progress=False)
    assert summary["samples"] == 3 and summary["skipped"] == {}
    batches, skipped = read_batches(summary["urls"], "vqa", tokenizer_dir)
    assert skipped == {} and [i for b in batches for i in b.ids] == [7000, 8000, 9000]
    assert batches[0].references[0] == answers(0) and batches[0].question_types == ["eight", "eight"]


def test_convert_vqav2_names_a_wrong_file(tmp_path, vqav2):
    with pytest.raises(ValueError, match="v2_mscoco_val2014_annotations.json.*'questions'"):
        convert_vqav2(vqav2["annotations"], None, vqav2["images"], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        convert_vqav2(tmp_path / "nope.json", None, vqav2["images"], tmp_path / "out", progress=False)


# -- GQA --------------------------------------------------------------------------------------------


def gqa_question(image_id: str, question: str, answer: str | None, structural: str = "verify") -> dict:
    row = {"semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image_id,
           "isBalanced": True, "groups": {"global": None, "local": "10c-weather"}, "semanticStr": "",
           "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
           "types": {"detailed": "weatherVerify", "semantic": "global", "structural": structural}}
    if answer is not None:
        row.update(answer=answer, fullAnswer=f"It is {answer}.")
    return row


def test_convert_gqa_keeps_one_reference_answer(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    for name in ("n161313", "n235859", "2354786"):
        save_jpeg(images / f"{name}.jpg", "green")
    questions = {"201307251": gqa_question("n161313", "Is it red?", "no"),
                 "201640614": gqa_question("n235859", "What colour is it?", "green", "query"),
                 "20968379": gqa_question("2354786", "Is it green?", "yes"),
                 "20968380": gqa_question("missing", "Is it blue?", "no")}
    path = write_json(tmp_path / "testdev_balanced_questions.json", questions)
    summary = convert_gqa(path, images, tmp_path / "out", shard_size=2, progress=False)
    assert summary["samples"] == 3 and summary["shards"] == 2 and summary["skipped"] == {"missing_image": 1}
    metas = [e["json"] for e in inspect(summary["urls"], n=3)["examples"]]
    assert [m["answers"] for m in metas] == [["no"], ["green"], ["yes"]]
    assert metas[1]["question_type"] == "query" and metas[1]["full_answer"] == "It is green."
    batches, skipped = read_batches(summary["urls"], "gqa", tokenizer_dir)
    assert skipped == {} and [i for b in batches for i in b.ids] == ["201307251", "201640614", "20968379"]
    assert [r for b in batches for r in b.references] == [["no"], ["green"], ["yes"]]
    assert {t for b in batches for t in b.tasks} == {"gqa"}  # scored by GQA's exact match, not VQAv2's 10-answer rule
    assert vqa_accuracy("green", batches[0].references[1]) == 0.0  # VQAv2's leave-one-out gives one answer 0


def test_convert_gqa_submission_split_without_answers(tmp_path):
    save_jpeg(tmp_path / "images" / "n1.jpg")
    path = write_json(tmp_path / "submission_all_questions.json", {"1": gqa_question("n1", "Is it red?", None)})
    summary = convert_gqa(path, tmp_path / "images", tmp_path / "out", progress=False)
    assert summary["samples"] == 1 and inspect(summary["urls"])["examples"][0]["json"]["answers"] == []


# -- Karpathy splits --------------------------------------------------------------------------------


def karpathy_image(imgid: int, filename: str, split: str, captions: list[str], **extra) -> dict:
    sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": imgid, "sentid": imgid * 10 + k}
                 for k, c in enumerate(captions)]
    return {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences], **extra}


@pytest.fixture
def karpathy_coco(tmp_path) -> dict[str, Path]:
    """``dataset_coco.json`` with one image per split, a missing image and an image without sentences."""
    root = tmp_path / "coco"
    entries = [("val2014", 391895, "test", ["A red picture.", "Red again."]),
               ("val2014", 522418, "test", ["A green picture."]),
               ("val2014", 184613, "val", ["A blue picture."]),
               ("train2014", 318556, "train", ["Two red pictures."]),
               ("val2014", 116100, "restval", ["A picture."]),
               ("val2014", 999999, "test", ["Gone."]),
               ("val2014", 888888, "test", [])]
    images = []
    for imgid, (folder, cocoid, split, captions) in enumerate(entries):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        if cocoid != 999999:
            save_jpeg(root / folder / filename)
        images.append(karpathy_image(imgid, filename, split, captions, filepath=folder, cocoid=cocoid))
    return {"json": write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"}), "root": root}


def test_convert_karpathy_coco_test_split(tmp_path, karpathy_coco, tokenizer_dir):
    summary = convert_karpathy(karpathy_coco["json"], karpathy_coco["root"], tmp_path / "out", progress=False)
    assert summary["splits"] == ["test"] and summary["dataset"] == "coco" and summary["items"] == 4
    assert summary["samples"] == 2 and summary["skipped"] == {"missing_image": 1, "no_captions": 1}
    info = inspect(summary["urls"], n=2)
    assert info["extensions"] == {"jpg": 2, "json": 2, "txt": 2}
    assert [e["txt"] for e in info["examples"]] == ["A red picture.", "A green picture."]
    assert info["examples"][0]["json"]["captions"] == ["A red picture.", "Red again."]
    assert info["examples"][0]["json"]["file_name"] == f"val2014/COCO_val2014_{391895:012d}.jpg"
    batches, skipped = read_batches(summary["urls"], "caption", tokenizer_dir)
    assert skipped == {} and batches[0].ids == [391895, 522418] and batches[0].tasks == ["caption"] * 2
    assert batches[0].references == [["A red picture.", "Red again."], ["A green picture."]]


def test_convert_karpathy_per_caption_gives_one_sample_per_caption(tmp_path, karpathy_coco, tokenizer_dir):
    summary = convert_karpathy(karpathy_coco["json"], karpathy_coco["root"], tmp_path / "out", progress=False,
                               per_caption=True)
    assert summary["samples"] == 3 and summary["per_caption"] is True  # 2 + 1 captions of the 2 usable images
    assert summary["skipped"] == {"missing_image": 1, "no_captions": 1}
    batches, _ = read_batches(summary["urls"], "caption", tokenizer_dir)
    rows = [(i, r) for b in batches for i, r in zip(b.ids, b.references)]
    assert [i for i, _ in rows] == [391895, 391895, 522418]
    info = inspect(summary["urls"], n=3)
    assert [e["txt"] for e in info["examples"]] == ["A red picture.", "Red again.", "A green picture."]
    assert rows[1][1] == ["A red picture.", "Red again."]  # every caption stays a reference


@pytest.mark.parametrize(("split", "cocoids"), [("train", [318556, 116100]), (("train",), [318556]),
                                                (["val", "restval"], [184613, 116100])])
def test_convert_karpathy_split_selection(tmp_path, karpathy_coco, split, cocoids):
    summary = convert_karpathy(karpathy_coco["json"], karpathy_coco["root"], tmp_path / "out", split=split,
                               progress=False)
    assert [e["json"]["image_id"] for e in inspect(summary["urls"], n=5)["examples"]] == cocoids


def test_convert_karpathy_flickr_uses_imgid_and_refuses_unknown_splits(tmp_path):
    images = tmp_path / "flickr30k-images"
    save_jpeg(images / "1000092795.jpg")
    data = {"images": [karpathy_image(0, "1000092795.jpg", "test", ["Two young guys.", "Two men outside."])],
            "dataset": "flickr30k"}
    path = write_json(tmp_path / "dataset_flickr30k.json", data)
    summary = convert_karpathy(path, images, tmp_path / "out", progress=False)
    meta = inspect(summary["urls"])["examples"][0]["json"]
    assert meta["image_id"] == 0 and meta["captions"] == ["Two young guys.", "Two men outside."]
    with pytest.raises(ValueError, match="'testing'"):
        convert_karpathy(path, images, tmp_path / "out2", split="testing", progress=False)


# -- CLI --------------------------------------------------------------------------------------------


def without_files(summary: dict) -> dict:
    """A written ``summary.json`` without its ``files`` list (what the tool printed)."""
    return {k: v for k, v in summary.items() if k != "files"}


def test_cli_convert_karpathy_and_vqav2(tmp_path, karpathy_coco, vqav2, capsys):
    out = tmp_path / "captions"
    assert main(["data", "convert-karpathy", "--karpathy-json", str(karpathy_coco["json"]),
                 "--images", str(karpathy_coco["root"]), "--out", str(out), "--split", "test", "val"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["splits"] == ["test", "val"] and summary["samples"] == 3
    assert summary == without_files(json.loads((out / "summary.json").read_text()))

    out = tmp_path / "vqa"
    assert main(["data", "convert-vqav2", "--questions", str(vqav2["questions"]), "--annotations",
                 str(vqav2["annotations"]), "--images", str(vqav2["images"]), "--out", str(out),
                 "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["samples"] == 5 and summary["shards"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
