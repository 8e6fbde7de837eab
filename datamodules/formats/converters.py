"""Converters from the official files of public data sets to mmlm shards (``mmlm data convert-…``).

- :func:`convert_vqav2`: VQAv2 (``v2_OpenEnded_mscoco_{split}_questions.json`` +
  ``v2_mscoco_{split}_annotations.json``) and OK-VQA (``OpenEnded_mscoco_{split}_questions.json`` +
  ``mscoco_{split}_annotations.json``, the same structure) → VQA samples, one per question.
- :func:`convert_gqa`: GQA (``{split}_balanced_questions.json``, ``{qid: {imageId, question, answer, …}}``)
  → VQA samples with the single reference ``answers: [answer]``.
- :func:`convert_karpathy`: Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``) →
  caption samples, one per image, all its captions kept (captioning and retrieval).

Every converter writes ``{out}/00000.tar, …`` with keys ``f"{i:09d}"`` (``i``: the item's position in the input,
so a skipped item leaves a gap) through
:class:`~datamodules.formats.shards.ShardWriter`, a ``jpg`` member per sample (JPEG files byte for byte,
other formats re-encoded as RGB JPEG), a ``json`` member (plus ``txt`` for captions) and
``{out}/summary.json``; unusable inputs (missing image file, question without annotation, …) are
skipped and counted by reason, never a crash. The item builders (:func:`vqav2_items`, :func:`gqa_items`,
:func:`karpathy_items`) and :func:`item_sample` also serve the raw files directly (:mod:`datamodules.formats.raw`), giving
the same samples byte for byte. See ``docs/data-formats.md``.
"""

from __future__ import annotations

import functools
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from rich.progress import track

from datamodules.formats.captions import jpeg_bytes
from datamodules.formats.outputs import check_output, prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.pipeline.transforms import DECODE_ERRORS

VQA_IMAGE_PATTERN = "COCO_{split}_{image_id:012d}.jpg"
KARPATHY_SPLITS = ("train", "restval", "val", "test")
MAX_EXAMPLES = 20
IMAGE_CACHE = 16  # consecutive questions usually share an image: read each file once


@dataclass
class Item:
    """One sample to write: an image file, its JSON metadata and caption (or why it is skipped).

    Attributes:
        image: the image file.
        meta: the sample's ``json`` member (``key`` is added when written).
        text: the ``txt`` member (captions), ``None`` for none.
        skip: reason the item cannot be used (``""``: usable).
        detail: what to name in ``skipped_examples`` for a skipped item.
    """

    image: Path
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    skip: str = ""
    detail: str = ""


# -- shared writing ---------------------------------------------------------------------------------


def load_json(path: str | Path, what: str) -> Any:
    """The parsed JSON file ``path``; errors name the file and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exn}") from exn


def image_member(path: Path) -> bytes:
    """The ``jpg`` member for ``path``: a JPEG file's own bytes (any mode), other formats as RGB JPEG.

    Only the image header is checked here (a truncated JPEG is caught when training decodes it).

    Raises:
        FileNotFoundError: the file does not exist.
        OSError, ValueError…: (:data:`~datamodules.pipeline.transforms.DECODE_ERRORS`) it is not an image.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return data
    return jpeg_bytes(path)[0]


def item_sample(item: Item, read: Callable[[Path], bytes], index: int) -> tuple[dict[str, Any] | None, str, str]:
    """``(sample, "", "")`` for a usable item, else ``(None, reason, detail)``.

    The sample (key ``f"{index:09d}"``, ``index`` = the item's position in its input) is what a shard holds and
    what :mod:`datamodules.formats.raw` serves for the raw files, so both give the same bytes.
    """
    if item.skip:
        return None, item.skip, item.detail
    try:
        data = read(item.image)
    except FileNotFoundError:
        return None, "missing_image", str(item.image)
    except DECODE_ERRORS as exn:
        return None, "bad_image", f"{item.image}: {exn!r}"
    key = f"{index:09d}"
    sample = {"__key__": key, "jpg": data,
              "json": json.dumps({"key": key, **item.meta}, ensure_ascii=False).encode("utf-8")}
    if item.text is not None:
        sample["txt"] = item.text.encode("utf-8")
    return sample, "", ""


def write_items(items: Sequence[Item], out: str | Path, info: dict[str, Any], shard_size: int,
                progress: bool, overwrite: bool = False) -> dict[str, Any]:
    """Write ``items`` as shards under ``out`` and ``summary.json``; ``out`` must be empty unless ``overwrite``
    (then only an earlier run's own files are replaced: :func:`datamodules.formats.outputs.prepare_output`).

    Returns:
        ``info`` plus ``items`` (inputs considered), ``samples``, ``shards``, ``urls`` (brace pattern,
        ``None`` if nothing was written), ``skipped`` (reason → count) and the first 20
        ``skipped_examples`` (``{item, reason}``).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    out = prepare_output(out, overwrite)
    sink, skipped, examples = ShardWriter(out, shard_size), Counter(), []
    read = functools.lru_cache(maxsize=IMAGE_CACHE)(image_member)
    for index, item in enumerate(track(items, description=f"writing shards to {out}", disable=not progress)):
        sample, reason, detail = item_sample(item, read, index)
        if sample is None:
            skipped[reason] += 1
            examples += [{"item": detail, "reason": reason}] if len(examples) < MAX_EXAMPLES else []
            continue
        sink.write(sample)
    sink.close()
    summary = {**info, "items": len(items), "samples": sink.count, "shards": sink.shards, "urls": sink.url(),
               "skipped": dict(skipped), "skipped_examples": examples}
    return write_summary(out, summary)


# -- VQAv2 / OK-VQA ---------------------------------------------------------------------------------


def vqa_image_split(data_subtype: str) -> str:
    """The image split of a VQA ``data_subtype``: test-dev questions use the test images
    (``test-dev2015`` → ``test2015``); others are unchanged (``val2014``)."""
    return data_subtype.replace("test-dev", "test")


def vqa_questions(data: Any, path: str | Path) -> list[dict[str, Any]]:
    """The ``questions`` list of a VQA questions file; ``ValueError`` naming the file otherwise."""
    rows = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"VQA questions file {str(path)!r} has no 'questions' list "
                         f"(expected {{'questions': [{{'image_id', 'question', 'question_id'}}], 'data_subtype', …}})")
    return rows


def vqa_annotations(path: str | Path) -> dict[Any, dict[str, Any]]:
    """``question_id → annotation`` of a VQA annotations file (``{"annotations": […]}``)."""
    data = load_json(path, "VQA annotations file")
    rows = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"VQA annotations file {str(path)!r} has no 'annotations' list")
    return {row.get("question_id"): row for row in rows if isinstance(row, dict)}


def vqa_answers(annotation: dict[str, Any] | None) -> list[str]:
    """The human answers (``answers[i]["answer"]``, usually 10) of an annotation; ``[]`` without one."""
    if annotation is None:
        return []
    return [str(a.get("answer", "")) for a in annotation.get("answers", []) if isinstance(a, dict)]


def vqa_file_name(pattern: str, split: str, image_id: Any) -> str:
    """``pattern`` filled with ``split`` and ``image_id``; ``ValueError`` naming both if it does not fit."""
    try:
        return pattern.format(split=split, image_id=image_id)
    except (KeyError, IndexError, ValueError, TypeError) as exn:
        raise ValueError(f"image_pattern {pattern!r} cannot name image {image_id!r} "
                         f"(fields: split, image_id): {exn!r}") from exn


def vqa_item(row: Any, annotations: dict[Any, dict[str, Any]] | None, image_dir: Path, pattern: str,
             split: str) -> Item:
    """The :class:`Item` of one VQA question (answers from its annotation, ``[]`` without annotations)."""
    if not isinstance(row, dict) or row.get("image_id") is None:
        return Item(image_dir, skip="missing_image_id", detail=repr(row)[:200])
    question, question_id = row.get("question"), row.get("question_id")
    if not isinstance(question, str) or not question.strip():
        return Item(image_dir, skip="missing_question", detail=f"question_id {question_id}")
    annotation = None if annotations is None else annotations.get(question_id)
    if annotations is not None and annotation is None:
        return Item(image_dir, skip="missing_annotation", detail=f"question_id {question_id}")
    name = vqa_file_name(pattern, split, row["image_id"])
    meta = {"question": question.strip(), "answers": vqa_answers(annotation), "question_id": question_id,
            "image_id": row["image_id"], "question_type": (annotation or {}).get("question_type", ""),
            "answer_type": (annotation or {}).get("answer_type", ""), "file_name": name}
    return Item(image_dir / name, meta)


def convert_vqav2(questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path,
                  out: str | Path, shard_size: int = 1000, image_pattern: str = VQA_IMAGE_PATTERN,
                  split: str | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Convert VQAv2 or OK-VQA questions (+ annotations) and COCO images into VQA shards.

    One sample per question: ``jpg`` (the COCO image) and ``json`` ``{"key", "question", "answers"
    (the 10 human answers; ``[]`` without annotations, e.g. test-dev), "question_id", "image_id",
    "question_type", "answer_type", "file_name"}``.

    Args:
        questions_json: ``v2_OpenEnded_mscoco_{split}_questions.json`` (OK-VQA:
            ``OpenEnded_mscoco_{split}_questions.json``).
        annotations_json: ``v2_mscoco_{split}_annotations.json`` (OK-VQA: ``mscoco_{split}_annotations.json``),
            or ``None`` for splits without answers (test-dev, test).
        image_dir: folder holding the split's images (e.g. ``val2014/``).
        out: output directory (created).
        shard_size: samples per shard.
        image_pattern: image file name under ``image_dir``, a format string with ``{split}`` and
            ``{image_id}`` (COCO 2017 names: ``"{image_id:012d}.jpg"``).
        split: the ``{split}`` of ``image_pattern`` (default: the questions file's ``data_subtype``,
            ``test-dev2015`` → ``test2015``).
        progress: show a rich progress bar.
        overwrite: replace an earlier run's files in ``out`` (else ``out`` must be empty).

    Returns:
        The summary (see :func:`write_items`) with ``format``, ``input``, ``annotations``,
        ``image_root`` and ``split``. Skip reasons: ``missing_image``, ``bad_image``,
        ``missing_annotation``, ``missing_question``, ``missing_image_id``.
    """
    check_output(out, overwrite)
    data = load_json(questions_json, "VQA questions file")
    items, info = vqav2_items(data, questions_json, annotations_json, image_dir, image_pattern, split)
    return write_items(items, out, info, shard_size, progress, overwrite)


def vqav2_items(data: Any, questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path,
                image_pattern: str = VQA_IMAGE_PATTERN, split: str | None = None) -> tuple[list[Item], dict[str, Any]]:
    """The items (one per question, in file order) and summary info of a parsed VQA questions file ``data``.

    Arguments as :func:`convert_vqav2`; shared by it and the raw reader (:mod:`datamodules.formats.raw`).
    """
    rows = vqa_questions(data, questions_json)
    split = split if split is not None else vqa_image_split(str(data.get("data_subtype") or ""))
    if "{split" in image_pattern and not split:
        raise ValueError(f"{str(questions_json)!r} has no data_subtype: pass split=… for image_pattern {image_pattern!r}")
    annotations = vqa_annotations(annotations_json) if annotations_json is not None else None
    root = Path(image_dir)
    items = [vqa_item(row, annotations, root, image_pattern, split) for row in rows]
    info = {"format": "vqav2", "input": str(questions_json),
            "annotations": None if annotations_json is None else str(annotations_json),
            "image_root": str(root), "split": split}
    return items, info


# -- GQA --------------------------------------------------------------------------------------------


def gqa_item(question_id: str, row: Any, image_dir: Path) -> Item:
    """The :class:`Item` of one GQA question: ``answers`` is ``[answer]`` (``[]`` when the split has none)."""
    if not isinstance(row, dict) or not row.get("imageId"):
        return Item(image_dir, skip="missing_image_id", detail=f"question_id {question_id}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        return Item(image_dir, skip="missing_question", detail=f"question_id {question_id}")
    answer = row.get("answer")
    types = row.get("types") if isinstance(row.get("types"), dict) else {}
    meta = {"question": question.strip(), "answers": [answer] if isinstance(answer, str) and answer else [],
            "question_id": question_id, "image_id": row["imageId"], "question_type": types.get("structural", ""),
            "answer_type": types.get("semantic", ""), "full_answer": row.get("fullAnswer", ""),
            "types": types, "file_name": f"{row['imageId']}.jpg"}
    return Item(image_dir / meta["file_name"], meta)


def convert_gqa(questions_json: str | Path, image_dir: str | Path, out: str | Path, shard_size: int = 1000,
                progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Convert GQA questions (``{qid: {"imageId", "question", "answer", "fullAnswer", "types", …}}``) and
    images (``{imageId}.jpg``) into VQA shards.

    One sample per question: ``jpg`` and ``json`` ``{"key", "question", "answers": [answer] (one
    reference: the VQA metric then scores exact match; ``[]`` for the unanswered submission split),
    "question_id" (the string key), "image_id", "question_type" (``types.structural``: verify,
    query, choose, logical, compare), "answer_type" (``types.semantic``), "full_answer", "types",
    "file_name"}``.

    Returns:
        The summary (see :func:`write_items`) with ``format``, ``input`` and ``image_root``.
    """
    check_output(out, overwrite)
    data = load_json(questions_json, "GQA questions file")
    items, info = gqa_items(data, questions_json, image_dir)
    return write_items(items, out, info, shard_size, progress, overwrite)


def gqa_items(data: Any, questions_json: str | Path, image_dir: str | Path) -> tuple[list[Item], dict[str, Any]]:
    """The items (one per question, in file order) and summary info of a parsed GQA questions file ``data``."""
    if not isinstance(data, dict):
        raise ValueError(f"GQA questions file {str(questions_json)!r} is not a {{question_id: question}} object")
    root = Path(image_dir)
    items = [gqa_item(str(qid), row, root) for qid, row in data.items()]
    return items, {"format": "gqa", "input": str(questions_json), "image_root": str(root)}


# -- Karpathy splits (COCO, Flickr30k) --------------------------------------------------------------


def karpathy_splits(split: str | Sequence[str]) -> tuple[str, ...]:
    """The Karpathy ``split`` values selected: ``"train"`` alone means train + restval (the usual
    113k COCO training set); a sequence selects exactly its members."""
    splits = ("train", "restval") if split == "train" else (split,) if isinstance(split, str) else tuple(split)
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown or not splits:
        raise ValueError(f"Karpathy split {split!r}: expected some of {KARPATHY_SPLITS}")
    return splits


def karpathy_item(image: Any, image_root: Path) -> Item:
    """The caption :class:`Item` of one Karpathy image entry (``filepath``/``filename``, ``sentences``)."""
    if not isinstance(image, dict) or not image.get("filename"):
        return Item(image_root, skip="missing_file_name", detail=repr(image)[:200])
    name = str(Path(image.get("filepath") or "") / image["filename"])
    sentences = image.get("sentences") if isinstance(image.get("sentences"), list) else []
    captions = [s["raw"].strip() for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str)]
    captions = [c for c in captions if c]
    if not captions:
        return Item(image_root / name, skip="no_captions", detail=name)
    image_id = next((image[k] for k in ("cocoid", "imgid") if image.get(k) is not None), image["filename"])
    meta = {"caption": captions[0], "captions": captions, "image_id": image_id, "file_name": name,
            "split": image.get("split", "")}
    return Item(image_root / name, meta, text=captions[0])


def per_caption_items(item: Item) -> list[Item]:
    """One item per reference caption of an image item (same image, same ``image_id``), for retrieval."""
    if item.skip:
        return [item]
    return [Item(item.image, {**item.meta, "caption": c}, text=c) for c in item.meta["captions"]]


def convert_karpathy(karpathy_json: str | Path, image_root: str | Path, out: str | Path,
                     split: str | Sequence[str] = "test", shard_size: int = 1000,
                     progress: bool = True, per_caption: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Convert a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``) into caption shards.

    One sample per image of the chosen split(s): ``jpg``, ``txt`` (first raw caption) and ``json``
    ``{"key", "caption", "captions" (every raw caption: references for captioning, the text side
    of retrieval), "image_id" (``cocoid``, else ``imgid``, else ``filename``), "file_name", "split"}``.

    Args:
        karpathy_json: the split file, ``{"images": [{"filepath"?, "filename", "split", "cocoid"? ,
            "imgid", "sentences": [{"raw", "tokens", …}]}], "dataset"}``.
        image_root: folder that ``filepath/filename`` is relative to (COCO: the folder holding
            ``train2014/`` and ``val2014/``; Flickr30k: the image folder).
        out: output directory (created).
        split: ``"test"``, ``"val"``, ``"train"`` (= train + restval) or a sequence of split names.
        shard_size: samples per shard.
        progress: show a rich progress bar.
        per_caption: one sample per caption instead of per image (``txt``/``caption`` = that caption,
            same ``image_id``): the standard retrieval protocol (COCO 5k images × 25k captions);
            retrieval metrics count each image once by its id.
        overwrite: replace an earlier run's files in ``out`` (else ``out`` must be empty).

    Returns:
        The summary (see :func:`write_items`) with ``format``, ``input``, ``dataset``, ``image_root``
        and ``splits``. Skip reasons: ``missing_image``, ``bad_image``, ``no_captions``, ``missing_file_name``.
    """
    check_output(out, overwrite)
    data = load_json(karpathy_json, "Karpathy split file")
    items, info = karpathy_items(data, karpathy_json, image_root, split, per_caption)
    return write_items(items, out, info, shard_size, progress, overwrite)


def karpathy_items(data: Any, karpathy_json: str | Path, image_root: str | Path, split: str | Sequence[str] = "test",
                   per_caption: bool = False) -> tuple[list[Item], dict[str, Any]]:
    """The items (images of the chosen splits, in file order) and summary info of a parsed Karpathy split file.

    Arguments as :func:`convert_karpathy`; shared by it and the raw reader (:mod:`datamodules.formats.raw`).
    """
    splits = karpathy_splits(split)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"Karpathy split file {str(karpathy_json)!r} has no 'images' list")
    root = Path(image_root)
    items = [karpathy_item(image, root) for image in images if isinstance(image, dict) and image.get("split") in splits]
    if per_caption:
        items = [one for item in items for one in per_caption_items(item)]
    info = {"format": "karpathy", "input": str(karpathy_json), "dataset": data.get("dataset"),
            "image_root": str(root), "splits": list(splits), "per_caption": per_caption}
    return items, info
