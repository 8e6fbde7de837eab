"""The ``mmlm data`` document tools: ``synth-docs``, ``synth-receipts`` (:mod:`datamodules.synthetic.documents`) and
``convert-donut`` (:func:`convert_donut`), writing Donut's layout (:mod:`datamodules.formats.donut_folder`) as shards
and/or folders. Module-level imports stay light (the ``mmlm data`` parser imports this module).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.formats.donut_folder import (
    LAYOUTS,
    METADATA,
    MetadataLine,
    has_image,
    image_extension,
    parse_ground_truth,
    raw_sample,
    read_metadata,
    record_parses,
    write_special_tokens,
)
from datamodules.tools.general import add_synthetic_arguments


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
        from datamodules.formats.shards import ShardWriter

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

    from datamodules.formats.shards import ShardWriter

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
    (:func:`datamodules.formats.outputs.prepare_output`).
    """
    from datamodules.formats.outputs import prepare_output, write_summary

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
