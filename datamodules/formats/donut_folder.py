"""Donut's dataset layout, read and described: the folder (``metadata.jsonl`` + images) and the shards written from it.

Donut folder layout (one folder per split)::

    train/metadata.jsonl     {"file_name": "receipt_00000.jpg", "ground_truth": "{\"gt_parse\": {…}}"} per line
    train/receipt_00000.jpg

``ground_truth`` is a JSON *string* holding ``{"gt_parse": …}`` or ``{"gt_parses": [… , …]}``.

Shard layout: sample key = the metadata line number ``f"{line:09d}"``, the image bytes unchanged
under their file extension (``jpeg`` → ``jpg``), and ``json`` = the metadata line's object
(``file_name``, ``ground_truth``). ``special_tokens.json`` beside the shards lists the tokens the
ground truths need (:func:`mmlm.json_tokens.special_tokens`).

Readers (:func:`read_metadata`, :func:`raw_sample`, :func:`read_ground_truths`) serve the document datamodule, raw
sources and the ``mmlm data`` document tools (:mod:`datamodules.tools.documents`, which write this layout).
Module-level imports stay light (the ``mmlm data`` parser imports this module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA = "metadata.jsonl"
SPECIAL_TOKENS_FILE = "special_tokens.json"
#: Image extensions read from a Donut folder and written to shards (the first present is decoded).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "bmp", "gif", "img")
LAYOUTS = ("shards", "folder")


@dataclass(frozen=True)
class MetadataLine:
    """One line of ``metadata.jsonl``: its 0-based number, raw text, file name (``""`` when the line
    does not parse) and byte span ``[start, end)`` in the file."""

    line: int
    text: str
    file_name: str
    start: int = 0
    end: int = 0

    @property
    def key(self) -> str:
        """The sample key shared by the folder reader and the shards (``f"{line:09d}"``)."""
        return f"{self.line:09d}"


def parse_lines(data: bytes, first_line: int = 0, offset: int = 0) -> list[MetadataLine]:
    """The non-empty lines of (a byte range of) ``metadata.jsonl``; lines end at ``\n`` only."""
    lines, start = [], 0
    for number, raw in enumerate(data.split(b"\n"), first_line):
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            lines.append(MetadataLine(number, text, _file_name(text), offset + start, offset + start + len(raw)))
        start += len(raw) + 1
    return lines


def read_metadata(folder: str | Path) -> list[MetadataLine]:
    """Non-empty lines of ``folder/metadata.jsonl`` (see :func:`parse_lines`).

    Raises:
        FileNotFoundError: the folder has no ``metadata.jsonl``.
    """
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"Donut folder {str(folder)!r} has no {METADATA}")
    return parse_lines(path.read_bytes())


def read_span(folder: str | Path, first_line: int, start: int, end: int) -> list[MetadataLine]:
    """The lines of bytes ``[start, end)`` of ``folder/metadata.jsonl``, numbered from ``first_line``."""
    with open(Path(folder) / METADATA, "rb") as file:
        file.seek(start)
        return parse_lines(file.read(end - start), first_line, start)


def _file_name(text: str) -> str:
    """``file_name`` of a metadata line, ``""`` when the line is not such an object."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return ""
    name = row.get("file_name") if isinstance(row, dict) else None
    return name if isinstance(name, str) else ""


def image_extension(file_name: str) -> str:
    """The shard extension of an image file (``jpeg`` → ``jpg``, ``tiff`` → ``tif``, unknown → ``img``)."""
    ext = Path(file_name).suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
    return ext if ext in IMAGE_EXTENSIONS else "img"


def has_image(sample: dict[str, Any]) -> bool:
    """Whether a raw sample holds an image member."""
    return any(ext in sample for ext in IMAGE_EXTENSIONS)


def raw_sample(folder: str | Path, record: MetadataLine) -> dict[str, Any]:
    """The shard sample of one metadata line; without the image member when the file is missing."""
    sample: dict[str, Any] = {"__key__": record.key, "__url__": str(folder), "json": record.text.encode("utf-8")}
    path = Path(folder) / record.file_name
    if record.file_name and path.is_file():
        sample[image_extension(record.file_name)] = path.read_bytes()
    return sample


def parse_ground_truth(text: str) -> list[Any]:
    """The parses of a ``ground_truth`` string: ``[gt_parse]`` or ``gt_parses``.

    Raises:
        ValueError: not JSON, or neither a ``gt_parse`` nor a non-empty ``gt_parses`` list.
    """
    data = json.loads(text)
    if isinstance(data, dict) and "gt_parses" in data:
        parses = data["gt_parses"]
        if isinstance(parses, list) and parses:
            return parses
    elif isinstance(data, dict) and "gt_parse" in data:
        return [data["gt_parse"]]
    raise ValueError(f"ground_truth must hold gt_parse or a non-empty gt_parses list, got {text[:120]!r}")


def record_parses(record: MetadataLine) -> list[Any]:
    """The parses of one metadata line; ``[]`` when the line or its ground truth does not parse."""
    try:
        row = json.loads(record.text)
        return parse_ground_truth(row["ground_truth"])
    except (ValueError, KeyError, TypeError):
        return []


def read_ground_truths(path: str | Path | Sequence[str]) -> list[list[Any]]:
    """The parses of every usable sample of a Donut folder or of shards (folder of ``*.tar``, pattern or list),
    in reading order; samples whose ground truth does not parse are left out."""
    if isinstance(path, (str, Path)) and (Path(path) / METADATA).is_file():
        found = [record_parses(record) for record in read_metadata(path)]
    else:
        import webdataset as wds

        from datamodules.pipeline.urls import expand_urls

        urls = str(Path(path) / "*.tar") if isinstance(path, (str, Path)) and Path(path).is_dir() else path
        samples = wds.tarfile_samples([{"url": u} for u in expand_urls(urls)])
        found = [record_parses(MetadataLine(0, s["json"].decode("utf-8"), "")) for s in samples if "json" in s]
    return [parses for parses in found if parses]


def write_special_tokens(directory: Path, parses: Sequence[Any], categorical_fields: Sequence[str]) -> list[str]:
    """Write ``directory/special_tokens.json`` for ``parses``; returns the tokens."""
    from mmlm.json_tokens import special_tokens

    tokens = special_tokens(parses, categorical_fields)
    info = {"tokens": tokens, "categorical_fields": sorted(categorical_fields)}
    (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return tokens
