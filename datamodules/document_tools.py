"""Donut's dataset layout ↔ shards, and the ``mmlm data`` document tools.

Donut folder layout (one folder per split)::

    train/metadata.jsonl     {"file_name": "receipt_00000.jpg", "ground_truth": "{\"gt_parse\": {…}}"} per line
    train/receipt_00000.jpg

``ground_truth`` is a JSON *string* holding ``{"gt_parse": …}`` or ``{"gt_parses": [… , …]}``.

Shard layout: sample key = the metadata line number ``f"{line:09d}"``, the image bytes unchanged
under their file extension (``jpeg`` → ``jpg``), and ``json`` = the metadata line's object
(``file_name``, ``ground_truth``). ``special_tokens.json`` beside the shards lists the tokens the
ground truths need (:func:`mmlm.json_tokens.special_tokens`).

Tools: ``mmlm data synth-docs``, ``synth-receipts`` (:mod:`datamodules.synthetic.documents`) and
``convert-donut`` (:func:`convert_donut`). Module-level imports stay light (the ``mmlm data``
parser imports this module).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.shard_tools import add_synthetic_arguments

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


def chunk_tar(folder: str | Path, records: Sequence[MetadataLine]) -> bytes:
    """An in-memory tar of the raw samples of ``records`` (the same members a converted shard has)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            sample = raw_sample(folder, record)
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{record.key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


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

        from datamodules.urls import expand_urls

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


class DonutWriter:
    """Writes documents as shards (+ ``special_tokens.json``) and/or as a Donut folder, or both.

    Args:
        shard_dir: shard folder (``None``: no shards).
        folder: Donut folder (``None``: no folder layout).
        shard_size: samples per shard.
        prefix: shard name prefix (``"docs-"`` → ``docs-00000.tar``).
        categorical_fields: keys whose values become category tokens in ``special_tokens.json``.
    """

    def __init__(self, shard_dir: Path | None, folder: Path | None, shard_size: int, prefix: str = "",
                 categorical_fields: Sequence[str] = ()) -> None:
        from datamodules.shards import ShardWriter

        self.shard_dir, self.folder, self.categorical_fields = shard_dir, folder, list(categorical_fields)
        self.shards = None
        self.lines: list[str] = []
        self.parses: list[Any] = []
        for directory in (shard_dir, folder):
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
        if shard_dir is not None:
            self.shards = ShardWriter(shard_dir, shard_size, prefix)

    def write(self, file_name: str, image: bytes, ground_truth: dict[str, Any]) -> None:
        """Add one document: its image file name and bytes, and ``{"gt_parse": …}``/``{"gt_parses": […]}``."""
        text = json.dumps({"file_name": file_name, "ground_truth": json.dumps(ground_truth, ensure_ascii=False)},
                          ensure_ascii=False)
        record = MetadataLine(len(self.lines), text, file_name)
        self.lines.append(text)
        self.parses.extend(parse_ground_truth(json.loads(text)["ground_truth"]))
        if self.folder is not None:
            (self.folder / file_name).write_bytes(image)
        if self.shards is not None:
            self.shards.write({"__key__": record.key, image_extension(file_name): image, "json": text.encode()})

    def close(self) -> dict[str, Any]:
        """Finish the shards, write ``metadata.jsonl`` and ``special_tokens.json``; returns a summary."""
        summary: dict[str, Any] = {"samples": len(self.lines)}
        if self.shards is not None:
            self.shards.close()
            write_special_tokens(self.shard_dir, self.parses, self.categorical_fields)
            summary.update(shards=self.shards.shards, urls=self.shards.url())
        if self.folder is not None:
            (self.folder / METADATA).write_text("".join(line + "\n" for line in self.lines), encoding="utf-8")
            summary["folder"] = str(self.folder)
        return summary


# --------------------------------------------------------------------------- converter


def split_folders(root: Path) -> dict[str, Path]:
    """``{"": root}`` when ``root`` is a Donut folder, else ``{name: subfolder}`` of its split folders."""
    if (root / METADATA).is_file():
        return {"": root}
    found = {p.name: p for p in sorted(root.iterdir()) if (p / METADATA).is_file()} if root.is_dir() else {}
    if not found:
        raise FileNotFoundError(f"{str(root)!r} is neither a Donut folder ({METADATA}) nor holds split folders with one")
    return found


def convert_folder(folder: Path, out: Path, shard_size: int, prefix: str,
                   categorical_fields: Sequence[str], progress: bool = True) -> dict[str, Any]:
    """Convert one Donut folder to shards (a progress bar on stderr unless ``progress`` is false); bad lines and
    missing images are skipped and counted."""
    from rich.console import Console
    from rich.progress import track

    from datamodules.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    sink, skipped, parses = ShardWriter(out, shard_size, prefix), Counter(), []
    for record in track(read_metadata(folder), description=f"converting {folder}", disable=not progress,
                        console=Console(stderr=True)):
        sample, found = raw_sample(folder, record), record_parses(record)
        reason = "bad_ground_truth" if not found else "" if has_image(sample) else "missing_image"
        if reason:
            skipped[reason] += 1
            continue
        sink.write(sample)
        parses.extend(found)
    sink.close()
    tokens = write_special_tokens(out, parses, categorical_fields)
    return {"input": str(folder), "samples": sink.count, "shards": sink.shards, "urls": sink.url(),
            "skipped": dict(skipped), "special_tokens": len(tokens)}


def convert_donut(input: str | Path, out: str | Path, shard_size: int = 1000, prefix: str = "",
                  categorical_fields: Sequence[str] = (), overwrite: bool = False, progress: bool = True
                  ) -> dict[str, Any]:
    """Convert a Donut folder (or a data set root with one folder per split) to shards (a progress bar per folder on
    stderr unless ``progress`` is false).

    Writes ``out/{prefix}{i:05d}.tar`` + ``special_tokens.json`` (or ``out/<split>/…`` per split
    folder of a root) and ``out/summary.json``; returns the summary. ``out`` must be empty unless ``overwrite``
    (:func:`datamodules.outputs.prepare_output`).
    """
    from datamodules.outputs import prepare_output, write_summary

    root = Path(input)
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    folders = split_folders(root)
    out = prepare_output(out, overwrite)
    splits = {name: convert_folder(folder, out / name, shard_size, prefix, categorical_fields, progress)
              for name, folder in folders.items()}
    summary = splits[""] if "" in splits else {"splits": splits}
    return write_summary(out, summary, indent=1)


# --------------------------------------------------------------------------- CLI


def _synth_args(tool: argparse.ArgumentParser, what: str) -> None:
    """Arguments shared by ``synth-docs`` and ``synth-receipts``."""
    add_synthetic_arguments(tool, "documents", train=None, val=None, shard_size=None, seed=None,
                            out_help=f"output folder: shards/{{train,validation}}/ and donut/{{…}}/ of {what}")
    tool.add_argument("--width", type=int, default=None, help="image width in pixels")
    tool.add_argument("--height", type=int, default=None, help="image height in pixels")
    tool.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both", help="shards, Donut folders or both")


def _run_synth(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``synth-docs`` / ``synth-receipts`` (unset options keep the generator's defaults)."""
    from datamodules.synthetic.documents import write_documents

    given = {k: getattr(args, k) for k in ("train", "val", "seed", "width", "height", "shard_size")
             if getattr(args, k) is not None}
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    return write_documents(args.out, kind=args.kind, layouts=layouts, overwrite=args.overwrite, **given)


def _run_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``convert-donut``."""
    return convert_donut(args.input, args.out, shard_size=args.shard_size, prefix=args.prefix,
                         categorical_fields=args.categorical_fields, overwrite=args.overwrite)


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Register ``synth-docs``, ``synth-receipts`` and ``convert-donut`` under ``mmlm data``."""
    docs = sub.add_parser("synth-docs", help="render SynthDoG-style documents with known text (reading task)")
    _synth_args(docs, "documents")
    docs.set_defaults(run=_run_synth, kind="docs")
    receipts = sub.add_parser("synth-receipts", help="render receipts with CORD-like ground truth (extraction task)")
    _synth_args(receipts, "receipts")
    receipts.set_defaults(run=_run_synth, kind="receipts")
    convert = sub.add_parser("convert-donut", help="Donut folder (metadata.jsonl + images) or split root → shards")
    convert.add_argument("input", help="folder with metadata.jsonl, or a root with one such folder per split")
    convert.add_argument("--out", required=True, help="output folder for the shards")
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    convert.add_argument("--prefix", default="", help="shard name prefix")
    convert.add_argument("--categorical-fields", nargs="*", default=[],
                         help="keys whose values are category tokens (e.g. class for RVL-CDIP)")
    convert.set_defaults(run=_run_convert)
