"""Data tools behind ``mmlm data …``: write img2dataset-style caption shards, inspect shards.

``make_shards`` reads one of three inputs and writes ``{out}/00000.tar, 00001.tar, …`` with
samples ``{key}.jpg``, ``{key}.txt`` (first caption), ``{key}.json`` (``key``, ``caption``,
``captions``, ``image_id``, ``file_name``, ``width``, ``height``), keys ``f"{i:09d}"`` (``i``: the
record's position in the input), plus ``{out}/summary.json``. ``image_id`` is the source's own id with
its type (COCO: the integer ``id``; a jsonl line's ``image_id``), else the image file's stem, so caption
results are keyed by the source's image ids. Inputs that cannot be used (missing or unreadable image,
bad line, image without caption) are skipped and counted by reason, never a crash. ``val_fraction``
holds out a deterministic share of the images (by a stable hash of the file name) as ``{out}/val/``
beside ``{out}/train/``. The same readers and :func:`record_problem` serve these inputs directly,
without shards (:mod:`datamodules.raw`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from datamodules.base import expand_urls
from datamodules.shards import ShardWriter
from datamodules.transforms import DECODE_ERRORS, to_rgb

FORMATS = ("folder-jsonl", "folder-tsv", "coco")
TSV_HEADER_FIELDS = {"file", "file_name", "filename", "image", "path"}
JPEG_QUALITY = 95


@dataclass
class Record:
    """One image and its captions read from an input (or a reason it cannot be used)."""

    file_name: str
    captions: list[str]
    image_id: Any
    skip: str = ""


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(n, line)`` for every non-blank line of a UTF-8 text file, ``n`` counting all lines from 1."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield n, line


def read_jsonl(path: Path) -> Iterator[Record]:
    """Records of a jsonl file: ``{"image" | "file_name": …, "caption": … | "captions": […]}`` per line."""
    for n, line in numbered_lines(path):
        try:
            row = json.loads(line)
            name = row.get("image") or row.get("file_name")
            captions = row.get("captions") or [row.get("caption")]
            captions = [captions] if isinstance(captions, str) else list(captions)
        except (json.JSONDecodeError, AttributeError, TypeError):
            yield Record(f"line {n}", [], "", skip="bad_jsonl_line")
            continue
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        name = str(name or "")
        yield Record(name, captions, row.get("image_id", Path(name).stem), skip="" if name else "missing_file_name")


def read_tsv(path: Path) -> Iterator[Record]:
    """Records of a tsv file with ``file<TAB>caption`` lines (an optional header line is skipped)."""
    for n, line in numbered_lines(path):
        name, sep, caption = line.partition("\t")
        if n == 1 and name.strip().lower() in TSV_HEADER_FIELDS:
            continue
        skip = "" if sep and name.strip() else "bad_tsv_line"
        yield Record(name.strip() or f"line {n}", [caption.strip()] if caption.strip() else [], Path(name.strip()).stem,
                     skip=skip)


def read_coco(path: Path) -> Iterator[Record]:
    """One record per image of a COCO captions JSON (``images`` + ``annotations``), all captions kept."""
    return coco_records(json.loads(path.read_text(encoding="utf-8")))


def coco_records(data: dict[str, Any]) -> Iterator[Record]:
    """One record per image of a parsed COCO captions JSON, in ``images`` order, with all its captions."""
    captions: dict[Any, list[str]] = {}
    for ann in data.get("annotations", []):
        caption = ann.get("caption")
        if isinstance(caption, str) and caption.strip():
            captions.setdefault(ann.get("image_id"), []).append(caption.strip())
    for image in data.get("images", []):
        found = captions.get(image.get("id"), [])
        yield Record(str(image.get("file_name", "")), found, image.get("id"), skip="" if found else "no_captions")


def read_records(path: Path, fmt: str) -> list[Record]:
    """All records of ``path`` in format ``fmt`` (one of :data:`FORMATS`)."""
    readers = {"folder-jsonl": read_jsonl, "folder-tsv": read_tsv, "coco": read_coco}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{fmt} input {str(path)!r} is not a file")
    return list(readers[fmt](path))


def jpeg_bytes(path: Path) -> tuple[bytes, int, int]:
    """``(jpeg bytes, width, height)``: RGB JPEG files verbatim, anything else re-encoded as RGB JPEG.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError, ValueError…: (:data:`~datamodules.transforms.DECODE_ERRORS`) it does not decode.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format == "JPEG" and image.mode == "RGB":
            return data, image.width, image.height
        rgb = to_rgb(image)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), rgb.width, rgb.height


def to_sample(record: Record, image_root: Path, index: int) -> dict[str, Any]:
    """The shard sample of ``record``; raises ``FileNotFoundError`` or a decode error for a bad image."""
    data, width, height = jpeg_bytes(image_root / record.file_name)
    key = f"{index:09d}"
    meta = {"key": key, "caption": record.captions[0], "captions": record.captions, "image_id": record.image_id,
            "file_name": record.file_name, "width": width, "height": height}
    return {"__key__": key, "jpg": data, "txt": record.captions[0].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def record_problem(record: Record, image_root: Path, index: int) -> tuple[dict[str, Any] | None, str, str]:
    """``(sample, "", "")`` for a usable record, else ``(None, reason, detail)``."""
    if record.skip:
        return None, record.skip, record.file_name
    if not record.captions:
        return None, "missing_caption", record.file_name
    try:
        return to_sample(record, image_root, index), "", ""
    except FileNotFoundError:
        return None, "missing_image", record.file_name
    except DECODE_ERRORS as exn:
        return None, "bad_image", f"{record.file_name}: {exn!r}"


def make_shards(input: str | Path, out: str | Path, fmt: str, shard_size: int = 1000,
                progress: bool = True, image_root: str | Path | None = None,
                val_fraction: float = 0.0) -> dict[str, Any]:
    """Convert captions + images into img2dataset-style shards under ``out`` and write ``summary.json``.

    Args:
        input: the captions file: jsonl (``folder-jsonl``), tsv (``folder-tsv``) or COCO captions JSON (``coco``).
        out: output directory (created).
        fmt: one of ``folder-jsonl``, ``folder-tsv``, ``coco``.
        shard_size: samples per shard.
        progress: show a rich progress bar.
        image_root: directory image file names are relative to (default: the input file's directory).
        val_fraction: hold out about this fraction of the images as a validation split (``0``: none): an image goes
            to ``{out}/val/`` when a stable hash of its file name falls below it (:func:`held_out`), so every run puts
            the same images there and no image is in both splits; the others go to ``{out}/train/``.

    Returns:
        The summary: ``format``, ``input``, ``samples``, ``shards``, ``urls`` (brace pattern),
        ``skipped`` (reason → count) and ``skipped_examples`` (first 20 ``{item, reason}``). With
        ``val_fraction``: ``format``, ``input``, ``val_fraction`` and the summaries ``train`` and ``val`` (each also
        written as ``{out}/{split}/summary.json``).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path, out = Path(input), Path(out)
    root = Path(image_root) if image_root is not None else path.parent
    records = list(enumerate(read_records(path, fmt)))
    info = {"format": fmt, "input": str(path)}
    if not val_fraction:
        return write_records(records, root, out, info, shard_size, progress)
    parts = {"train": [r for r in records if not held_out(r[1].file_name, val_fraction)],
             "val": [r for r in records if held_out(r[1].file_name, val_fraction)]}
    summary = {**info, "val_fraction": val_fraction,
               **{name: write_records(part, root, out / name, {**info, "split": name}, shard_size, progress)
                  for name, part in parts.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def held_out(file_name: str, fraction: float) -> bool:
    """Whether the image ``file_name`` belongs to the validation split: the first 8 bytes of its name's SHA-256 as a
    number in ``[0, 1)`` fall below ``fraction`` (the same on every run, machine and Python version)."""
    digest = hashlib.sha256(file_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_records(records: list[tuple[int, Record]], image_root: Path, out: Path, info: dict[str, Any],
                  shard_size: int, progress: bool) -> dict[str, Any]:
    """Write ``(index, record)`` pairs as shards (key ``f"{index:09d}"``) under ``out`` plus ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    sink, skipped, examples = ShardWriter(out, shard_size), Counter(), []
    for index, record in track(records, description=f"writing shards to {out}", disable=not progress):
        sample, reason, detail = record_problem(record, image_root, index)
        if sample is None:
            skipped[reason] += 1
            examples += [{"item": detail, "reason": reason}] if len(examples) < 20 else []
            continue
        sink.write(sample)
    sink.close()
    summary = {**info, "samples": sink.count, "shards": sink.shards, "urls": sink.url(),
               "skipped": dict(skipped), "skipped_examples": examples}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def small_fields(sample: dict[str, Any], width: int = 120) -> dict[str, Any]:
    """``txt`` (truncated) and ``json`` (parsed, long strings truncated) of a raw sample, for display."""
    shown: dict[str, Any] = {"__key__": sample["__key__"], "exts": sorted(k for k in sample if not k.startswith("__"))}
    if "txt" in sample:
        shown["txt"] = sample["txt"].decode("utf-8", errors="replace")[:width]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            shown["json"] = {k: v[:width] if isinstance(v, str) else v for k, v in meta.items()} if isinstance(meta, dict) else meta
        except (json.JSONDecodeError, UnicodeDecodeError):
            shown["json"] = "<bad json>"
    return shown


def inspect(urls: str | list[str], n: int = 3) -> dict[str, Any]:
    """Read every sample of ``urls`` and summarise: ``shards``, ``samples``, ``extensions``
    (extension → samples having it), ``errors`` (tar read errors) and the first ``n`` ``examples``."""
    shards = expand_urls(urls)
    errors: list[str] = []
    extensions: Counter[str] = Counter()
    examples, count = [], 0
    handler = collect_errors(errors)
    for sample in wds.tarfile_samples([{"url": u} for u in shards], handler=handler):
        count += 1
        extensions.update(k for k in sample if not k.startswith("__"))
        if len(examples) < n:
            examples.append(small_fields(sample))
    return {"shards": len(shards), "samples": count, "extensions": dict(sorted(extensions.items())),
            "errors": len(errors), "error_messages": errors[:10], "examples": examples}


def collect_errors(errors: list[str]) -> Any:
    """A webdataset handler that records tar errors in ``errors`` and continues."""

    def handler(exn: Exception) -> bool:
        errors.append(repr(exn)[:300])
        return True

    return handler


def print_inspection(info: dict[str, Any], console: Console | None = None) -> None:
    """Pretty-print an :func:`inspect` result with rich."""
    console = console or Console()
    console.print(f"[bold]{info['samples']}[/] samples in [bold]{info['shards']}[/] shards, {info['errors']} tar errors")
    table = Table("extension", "samples")
    for ext, count in info["extensions"].items():
        table.add_row(ext, str(count))
    console.print(table)
    for example in info["examples"]:
        console.print(example)
    for message in info.get("error_messages", []):
        console.print(f"[red]{message}[/]")

