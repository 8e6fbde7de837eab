"""Data tools behind ``mmlm data …``: write img2dataset-style caption shards, inspect shards.

``make_shards`` reads a captions input — jsonl/tsv with image names, a COCO captions JSON, a LAVIS caption list
(``coco_karpathy_*.json``), a LAION / img2dataset parquet whose URL images come from an img2dataset download folder
(:mod:`datamodules.formats.downloads`) — and writes ``{out}/00000.tar, 00001.tar, …`` with samples ``{key}.jpg``,
``{key}.txt`` (first caption), ``{key}.json`` (``key``, ``caption``, ``captions``, ``image_id``, ``file_name``,
``width``, ``height``), keys ``f"{i:09d}"`` (``i``: the record's position in the input), plus
``{out}/summary.json``. ``image_id`` is the source's own id with its type (COCO: the integer ``id``; a jsonl line's
``image_id``; a parquet row's ``key``/``SAMPLE_ID``), else the image file's stem (LAVIS: the COCO file name's
number), so caption results are keyed by the source's image ids. Inputs that cannot be used (missing or unreadable
image, bad line, image without caption) are skipped and counted by reason, never a crash; images larger than the
readers accept (``max_pixels``) are downsized, keeping their aspect, and counted. ``val_fraction`` holds out a
deterministic share of the images (by a stable hash of the file name) as ``{out}/val/`` beside ``{out}/train/``. The
output folder is handled by :mod:`datamodules.formats.outputs` (never clobbered). The same readers and
:func:`record_problem` serve these inputs directly, without shards (:mod:`datamodules.formats.raw`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from rich.console import Console
from rich.progress import track
from rich.table import Table

from datamodules.formats.captions import (
    MAX_EXAMPLES,
    Record,
    input_format,
    read_records,
    record_problem,
)
from datamodules.formats.outputs import check_output, prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.pipeline.transforms import MAX_IMAGE_PIXELS
from datamodules.pipeline.urls import expand_urls


def make_shards(input: str | Path, out: str | Path, fmt: str | None = None, shard_size: int = 1000,
                progress: bool = True, image_root: str | Path | None = None,
                val_fraction: float = 0.0, max_pixels: int | None = MAX_IMAGE_PIXELS,
                image_map: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert captions + images into img2dataset-style shards under ``out`` and write ``summary.json``.

    Args:
        input: the captions file: jsonl (``folder-jsonl``; also a JSON array), tsv (``folder-tsv``), COCO captions
            JSON (``coco``), LAVIS caption list (``lavis``) or parquet (``parquet``: LAION metadata / img2dataset).
        out: output directory, created; it must be empty unless ``overwrite`` (then only the files an earlier run
            listed in its ``summary.json`` are replaced: :mod:`datamodules.formats.outputs`).
        fmt: one of :data:`FORMATS`; ``None`` infers it (:func:`input_format`).
        shard_size: samples per shard.
        progress: show a rich progress bar.
        image_root: directory image file names are relative to (default: the input file's directory); for URLs, the
            img2dataset download folder.
        val_fraction: hold out about this fraction of the images as a validation split (``0``: none): an image goes
            to ``{out}/val/`` when a stable hash of its file name falls below it (:func:`held_out`), so every run puts
            the same images there and no image is in both splits; the others go to ``{out}/train/``.
        max_pixels: images with more pixels (which every reader skips as ``image_too_large``) are downsized to fit,
            keeping their aspect, and counted as ``downsized``; ``None``: no limit.
        image_map: a url → file map for URL inputs (:mod:`datamodules.formats.downloads`).
        overwrite: replace an earlier run's files in ``out``.

    Returns:
        The summary: ``format``, ``input``, ``samples``, ``shards``, ``urls`` (brace pattern), ``skipped`` (reason →
        count), ``skipped_examples`` (first 20 ``{item, reason}``), ``max_pixels``, ``downsized`` (count) and
        ``downsized_examples`` (first 20 ``{item, from, to}``). With ``val_fraction``: ``format``, ``input``,
        ``val_fraction`` and the summaries ``train`` and ``val`` (each also written as ``{out}/{split}/summary.json``).

    Raises:
        OutputExistsError: ``out`` holds files (see ``out``), checked before the input is read.
        IsADirectoryError, FileNotFoundError, InputError: the input is a folder, missing or of an unknown format.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path = Path(input)
    check_output(out, overwrite)
    root = Path(image_root) if image_root is not None else path.parent
    records = list(enumerate(read_records(path, fmt, root, image_map)))
    out = prepare_output(out, overwrite)
    info = {"format": fmt or input_format(path), "input": str(path), "max_pixels": max_pixels}
    write = partial(write_records, image_root=root, shard_size=shard_size, progress=progress, max_pixels=max_pixels)
    if not val_fraction:
        return write(records, out=out, info=info)
    parts = {"train": [r for r in records if not held_out(r[1].file_name, val_fraction)],
             "val": [r for r in records if held_out(r[1].file_name, val_fraction)]}
    summary = {**info, "val_fraction": val_fraction,
               **{name: write(part, out=out / name, info={**info, "split": name}) for name, part in parts.items()}}
    return write_summary(out, summary)


def held_out(file_name: str, fraction: float) -> bool:
    """Whether the image ``file_name`` belongs to the validation split: the first 8 bytes of its name's SHA-256 as a
    number in ``[0, 1)`` fall below ``fraction`` (the same on every run, machine and Python version)."""
    digest = hashlib.sha256(file_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_records(records: list[tuple[int, Record]], image_root: Path, out: Path, info: dict[str, Any],
                  shard_size: int, progress: bool, max_pixels: int | None = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Write ``(index, record)`` pairs as shards (key ``f"{index:09d}"``) under ``out`` plus ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    sink, skipped, examples, downsized = ShardWriter(out, shard_size), Counter(), [], []
    for index, record in track(records, description=f"writing shards to {out}", disable=not progress):
        sample, reason, detail = record_problem(record, image_root, index, max_pixels)
        if sample is None:
            skipped[reason] += 1
            examples += [{"item": detail, "reason": reason}] if len(examples) < MAX_EXAMPLES else []
            continue
        if "__downsized__" in sample:
            downsized.append(sample["__downsized__"])
        sink.write(sample)
    sink.close()
    summary = {**info, "samples": sink.count, "shards": sink.shards, "urls": sink.url(),
               "skipped": dict(skipped), "skipped_examples": examples, "downsized": len(downsized),
               "downsized_examples": downsized[:MAX_EXAMPLES]}
    return write_summary(out, summary)


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

