"""The synthetic shapes generator: scenes, captions, questions, shard layout, determinism, tokenizer."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from datamodules.synthetic import Shape, captions_for, image_rng, questions_for, render_scene, write_shapes
from datamodules.synthetic.shapes import ANSWERS, COLOURS, IMAGE_SIZE, SYNONYMS, vqa_text
from mmlm.metrics import vqa_accuracy
from mmlm.tokenizers import load_tokenizer

TRAIN, VAL, SHARD = 12, 6, 5


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, train=TRAIN, val=VAL, seed=3, shard_size=SHARD, progress=False)
    return out


def _read_tars(pattern: str) -> dict[str, dict[str, bytes]]:
    """All samples of the shards in a brace pattern: key -> {extension: bytes}, in shard order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for path in braceexpand(pattern):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------ scenes


def test_render_scene_is_deterministic_and_valid() -> None:
    image, scene = render_scene(np.random.default_rng(0))
    again, same = render_scene(np.random.default_rng(0))
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert scene == same and image.tobytes() == again.tobytes()
    for seed in range(50):
        _, scene = render_scene(np.random.default_rng(seed))
        assert 1 <= len(scene) <= 3
        assert [s.x for s in scene] == sorted(s.x for s in scene)
        assert all(9 <= s.radius <= 14 and s.radius <= s.x <= IMAGE_SIZE - 1 - s.radius for s in scene)


def test_pixels_match_scene() -> None:
    for idx in range(10):
        image, scene = render_scene(image_rng(0, "train", idx))
        pixels = np.asarray(image)
        for s in scene:
            y = s.y + s.radius // 3 if s.shape == "triangle" else s.y  # a triangle's centroid is lower
            assert tuple(pixels[y, s.x]) == COLOURS[s.colour]


def test_captions_for_hand_built_scenes() -> None:
    red_circle, blue_square = Shape("red", "circle", 12, 30, 10), Shape("blue", "square", 45, 20, 10)
    assert captions_for((red_circle, blue_square)) == [
        "a red circle left of a blue square.",
        "a blue square right of a red circle.",
        "a red circle and a blue square.",
        "two shapes: a red circle and a blue square.",
        "a picture of a red circle and a blue square.",
    ]
    triangles = (Shape("green", "triangle", 12, 12, 9), Shape("green", "triangle", 40, 40, 9))
    assert captions_for(triangles)[0] == "two green triangles."
    three = (red_circle, Shape("yellow", "circle", 30, 50, 9), Shape("red", "circle", 50, 12, 9))
    assert captions_for(three)[:2] == ["two red circles and a yellow circle.",
                                       "three shapes: two red circles and a yellow circle."]
    assert captions_for((red_circle,)) == ["a red circle.", "one shape: a red circle.", "a picture of a red circle."]


def test_questions_are_unambiguous() -> None:
    scene = (Shape("red", "circle", 10, 10, 9), Shape("blue", "square", 30, 40, 9), Shape("red", "circle", 50, 12, 9))
    for seed in range(20):
        questions = {q.question_type: q for q in questions_for(scene, np.random.default_rng(seed))}
        assert questions["colour"].question == "what colour is the square?" and questions["colour"].answer == "blue"
        assert questions["shape"].question == "what shape is the blue object?"
        assert "position" not in questions  # only one uniquely named shape
        assert questions["count"].answer == {"how many shapes are there?": "3", "how many circles are there?": "2",
                                             "how many squares are there?": "1",
                                             "how many triangles are there?": "0"}[questions["count"].question]
    pair = (Shape("red", "circle", 10, 10, 9), Shape("blue", "square", 40, 40, 9))
    answers = set()
    for seed in range(20):
        position = [q for q in questions_for(pair, np.random.default_rng(seed)) if q.question_type == "position"][0]
        left = position.question in ("is the red circle left of the blue square?",
                                     "is the blue square right of the red circle?")
        assert position.answer == ("yes" if left else "no")
        answers.add(position.answer)
    assert answers == {"yes", "no"}


# ------------------------------------------------------------------------------------ shards


def test_summary_counts_and_layout(shapes_dir: Path) -> None:
    summary = _summary(shapes_dir)
    assert summary["seed"] == 3 and summary["images"] == {"train": TRAIN, "val": VAL}
    assert summary["questions"] == {split: summary["splits"][split]["questions"] for split in ("train", "val")}
    for split, count in (("train", TRAIN), ("val", VAL)):
        block = summary["splits"][split]
        assert block["images"] == block["captions"] == count
        size = SHARD if split == "train" else min(SHARD, -(-VAL // 8))  # val: spread over up to 8 ranks
        assert block["shards"]["captions"] == -(-count // size)
        assert block["shards"]["vqa"] == -(-block["questions"] // size)
        assert sum(block["question_types"].values()) == sum(block["answers"].values()) == block["questions"]
        assert block["urls"]["captions"] == str(shapes_dir / split / f"captions-{{00000..{block['shards']['captions'] - 1:05d}}}.tar")
        for kind in ("captions", "vqa"):
            paths = list(braceexpand(block["urls"][kind]))
            assert all(Path(p).exists() for p in paths)
            assert sorted(str(p) for p in (shapes_dir / split).glob(f"{kind}-*.tar")) == sorted(paths)


def test_caption_samples(shapes_dir: Path) -> None:
    samples = _read_tars(_summary(shapes_dir)["splits"]["train"]["urls"]["captions"])
    assert list(samples) == [f"{i:09d}" for i in range(TRAIN)]
    for idx, (key, sample) in enumerate(samples.items()):
        assert set(sample) == {"jpg", "txt", "json"}
        meta = json.loads(sample["json"])
        _, scene = render_scene(image_rng(3, "train", idx))
        assert meta["captions"] == captions_for(scene)
        assert meta["caption"] == sample["txt"].decode() == meta["captions"][0]
        assert meta["image_id"] == f"train-{key}"
        assert Image.open(io.BytesIO(sample["jpg"])).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_vqa_samples(shapes_dir: Path) -> None:
    summary = _summary(shapes_dir)["splits"]["val"]
    samples = _read_tars(summary["urls"]["vqa"])
    captions = _read_tars(summary["urls"]["captions"])
    assert list(samples) == [f"{i:09d}" for i in range(summary["questions"])]
    allowed = {a for answers in ANSWERS.values() for a in answers} | set(SYNONYMS.values())
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert set(meta) == {"question", "answers", "question_id", "image_id", "question_type", "caption"}
        assert meta["question_id"] == f"val-{key}"
        assert len(meta["answers"]) == 10 and set(meta["answers"]) <= allowed
        top = max(set(meta["answers"]), key=meta["answers"].count)
        assert meta["answers"].count(top) >= 8 and vqa_accuracy(top, meta["answers"]) == 1.0
        image = captions[meta["image_id"].removeprefix("val-")]
        assert sample["jpg"] == image["jpg"]
        assert meta["caption"] == image["txt"].decode()  # the image's canonical caption, for context prompts


def test_webdataset_reads_shards(shapes_dir: Path) -> None:
    url = _summary(shapes_dir)["splits"]["val"]["urls"]["vqa"]
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil")
    first = next(iter(dataset))
    assert first["jpg"].size == (IMAGE_SIZE, IMAGE_SIZE) and "question" in first["json"]


def test_determinism_and_distinct_splits(shapes_dir: Path, tmp_path: Path) -> None:
    write_shapes(tmp_path / "same", train=TRAIN, val=VAL, seed=3, shard_size=SHARD, progress=False)
    write_shapes(tmp_path / "other", train=2, val=0, seed=4, shard_size=SHARD, progress=False)
    for path in shapes_dir.glob("*/*.tar"):
        assert (tmp_path / "same" / path.relative_to(shapes_dir)).read_bytes() == path.read_bytes()
    first = _read_tars(str(shapes_dir / "train" / "captions-00000.tar"))["000000000"]
    other = _read_tars(str(tmp_path / "other" / "train" / "captions-00000.tar"))["000000000"]
    assert first["jpg"] != other["jpg"]
    train = {s["jpg"] for s in _read_tars(str(shapes_dir / "train" / "captions-{00000..00002}.tar")).values()}
    val = {s["jpg"] for s in _read_tars(str(shapes_dir / "val" / "captions-{00000..00001}.tar")).values()}
    assert not train & val


def test_tokenizer_covers_every_text(shapes_dir: Path) -> None:
    tokenizer = load_tokenizer(shapes_dir / "tokenizer")
    texts = []
    for split in ("train", "val"):
        urls = _summary(shapes_dir)["splits"][split]["urls"]
        texts += [c for s in _read_tars(urls["captions"]).values() for c in json.loads(s["json"])["captions"]]
        for sample in _read_tars(urls["vqa"]).values():
            meta = json.loads(sample["json"])
            texts += [vqa_text(meta["question"], a) for a in meta["answers"]]
    assert "Question: what" in "".join(texts) and len(texts) > TRAIN
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    for word in ("question", "answer", ":", "?", ".", ",", "violet", "triangles", "three"):
        assert word in tokenizer.get_vocab()


def test_rewrite_removes_stale_shards_and_empty_split(tmp_path: Path) -> None:
    write_shapes(tmp_path, train=6, val=2, seed=0, shard_size=2, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):  # never into a folder holding files by default
        write_shapes(tmp_path, train=2, val=0, seed=0, shard_size=2, progress=False)
    summary = write_shapes(tmp_path, train=2, val=0, seed=0, shard_size=2, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").glob("captions-*.tar")) == ["captions-00000.tar"]
    assert not list((tmp_path / "val").glob("*.tar"))
    assert summary["splits"]["val"]["urls"] == {"captions": None, "vqa": None}
