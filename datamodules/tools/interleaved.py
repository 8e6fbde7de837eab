"""``mmlm data convert-obelics | convert-mmc4 | synth-interleaved``: interleaved documents → shards.

Both converters read documents as released — ``.jsonl`` (one per line), MMC4's ``.jsonl.zip``, or a ``.parquet``
(OBELICS: one row per document) — and write ``{out}/docs-{i:05d}.tar`` with samples ``{key}.json`` (the document in
its own layout) + ``{key}.{j}.{ext}`` (each image found locally, the reference in the JSON replaced by the member name
``"{j}.{ext}"``), plus ``{out}/summary.json``.

* OBELICS: ``{"texts": [...], "images": [...], "metadata": "<JSON list>", "general_metadata": "<JSON object>"}``;
  an image is a path (relative to ``--images`` or the input's folder), a ``data:image/…;base64,`` URI, or a URL
  found through an img2dataset download folder (``--images``) or a url → file map (``--image-map``). Images that
  are not available locally are removed with their position — and their ``metadata`` entry, so the three lists stay
  aligned — and counted.
* MMC4: ``{"text_list": [...], "image_info": [{"image_name", "raw_url", "matched_text_index", "matched_sim"}, ...],
  ...}``; ``image_name`` is looked up under ``--images``, else ``raw_url`` through the download map; an entry that
  already holds ``image_base64`` keeps it in the JSON (the reader decodes it). Missing images are removed; the
  document keeps its text and its other images.

A line that is not JSON, not in the layout, or has no text left is skipped and counted.
"""

from __future__ import annotations

import argparse
import base64
import json
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.formats.downloads import UrlImages, is_parquet, parquet_rows, url_images
from datamodules.formats.outputs import check_output, prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.tools.general import add_synthetic_arguments

IMAGE_TYPES = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``convert-obelics``, ``convert-mmc4`` and ``synth-interleaved`` to the ``mmlm data`` subparsers."""
    for name, layout in (("convert-obelics", "OBELICS (texts/images lists)"),
                         ("convert-mmc4", "MMC4 (text_list + image_info)")):
        tool = sub.add_parser(name, help=f"interleaved documents in the {layout} jsonl layout → shards")
        tool.add_argument("input", help="documents: .jsonl (one per line), .jsonl.zip (MMC4's release) or .parquet "
                                        "(OBELICS' release)")
        tool.add_argument("--out", required=True, help="output directory")
        tool.add_argument("--images", default=None,
                          help="folder of the documents' images (default: the input's), or the img2dataset download "
                               "folder of their URLs")
        tool.add_argument("--image-map", default=None,
                          help="url → file map (.json object, .jsonl/.parquet with url and path, or .tsv)")
        tool.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
        tool.set_defaults(run=convert_obelics if name == "convert-obelics" else convert_mmc4)
    synth = sub.add_parser("synth-interleaved", help="synthetic interleaved shapes documents for KOSMOS-1 (k-shot)")
    add_synthetic_arguments(synth, "documents (validation: k-shot queries)", train=4000, val=150, shard_size=500,
                            train_flag="--docs")
    synth.set_defaults(run=synth_interleaved)


def synth_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Run the synthetic generator (pairs: docs / 2, text: docs / 4, support: max(50, val / 2))."""
    from datamodules.synthetic.interleaved import write_interleaved

    return write_interleaved(args.out, docs=args.docs, pairs=args.docs // 2, texts=args.docs // 4, val=args.val,
                             support=max(50, args.val // 2), seed=args.seed, shard_size=args.shard_size,
                             overwrite=args.overwrite)


def document_rows(path: Path) -> Iterator[Any]:
    """The documents of an input, one JSON value (or a ``ValueError`` for a bad line) each: a ``.jsonl``, the
    ``.jsonl.zip`` MMC4 ships (every ``.jsonl`` member), or a ``.parquet`` (OBELICS: one row per document)."""
    if is_parquet(path):
        yield from parquet_rows(path)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in sorted(n for n in archive.namelist() if n.endswith(".jsonl")):
                yield from json_lines(archive.read(member).decode("utf-8"))
    else:
        yield from json_lines(path.read_text(encoding="utf-8"))


def json_lines(text: str) -> Iterator[Any]:
    """The parsed non-blank lines of ``text`` (a line that is not JSON comes as its ``ValueError``)."""
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exn:
                yield exn


def input_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a documents input (a folder or missing file), else ``None``."""
    if path.is_dir():
        return (f"input {str(path)!r} is a folder: expected a .jsonl, .jsonl.zip or .parquet of documents (images go "
                "to --images)")
    if not path.is_file():
        return f"input {str(path)!r}: no such file"
    return None


@dataclass
class ImageFinder:
    """Finds a document's image: a ``data:`` URI, a local path (under ``folder``), or a URL downloaded beforehand
    (``urls``: an img2dataset folder or url → file map, :mod:`datamodules.formats.downloads`)."""

    folder: Path
    urls: UrlImages | None = None

    def load(self, ref: Any) -> tuple[bytes, str] | None:
        """``(bytes, ext)`` of an image reference; ``None`` when it is not available here."""
        if not isinstance(ref, str) or not ref:
            return None
        if ref.startswith("data:image/") and ";base64," in ref:
            kind = ref[len("data:image/"):ref.index(";")]
            return base64.b64decode(ref.split(",", 1)[1]), IMAGE_TYPES.get(kind, "jpg")
        if "://" in ref:
            location = self.urls.get(ref) if self.urls is not None else None
            return None if location is None else (location.read(), IMAGE_TYPES.get(location.suffix, "jpg"))
        path = Path(ref) if Path(ref).is_absolute() else self.folder / ref
        if not path.is_file():
            return None
        return path.read_bytes(), IMAGE_TYPES.get(path.suffix.lower().lstrip("."), "jpg")


def load_image(ref: Any, folder: Path) -> tuple[bytes, str] | None:
    """``(bytes, ext)`` of a local path or data URI; ``None`` when not available here (URL, missing file)."""
    return ImageFinder(folder).load(ref)


def aligned_metadata(metadata: Any, keep: list[bool]) -> Any:
    """OBELICS ``metadata`` (a JSON string of a list as long as ``texts``, or that list) with the positions of
    ``keep`` only, in the same form; left unchanged when it is not such a list."""
    parsed = json.loads(metadata) if isinstance(metadata, str) else metadata
    if not isinstance(parsed, list) or len(parsed) != len(keep):
        return metadata
    kept = [entry for entry, k in zip(parsed, keep) if k]
    return json.dumps(kept, ensure_ascii=False) if isinstance(metadata, str) else kept


def obelics_document(doc: dict[str, Any], finder: ImageFinder | Path, counts: Counter
                     ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The document with its available images as members; unavailable images are removed with their position (and
    their ``metadata`` entry) and counted as ``images_missing``."""
    finder = finder if isinstance(finder, ImageFinder) else ImageFinder(finder)
    texts, images = doc["texts"], doc["images"]
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise ValueError("texts/images must be lists of equal length")
    kept_texts, kept_images, keep, members = [], [], [], {}
    for text, image in zip(texts, images):
        loaded = None if image is None else finder.load(image)
        if image is not None and loaded is None:
            counts["images_missing"] += 1
            keep.append(False)
            continue
        keep.append(True)
        name = None if loaded is None else f"{len(members)}.{loaded[1]}"
        if loaded is not None:
            members[name] = loaded[0]
        kept_texts.append(text if loaded is None else None)
        kept_images.append(name)
    out = {**doc, "texts": kept_texts, "images": kept_images}
    if "metadata" in doc:
        out["metadata"] = aligned_metadata(doc["metadata"], keep)
    return out, members


def mmc4_document(doc: dict[str, Any], finder: ImageFinder | Path, counts: Counter
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The document with local images as members (``image_name`` under the folder, else ``raw_url`` through the
    download map), base64 ones kept, the rest removed and counted; its text is always kept."""
    finder = finder if isinstance(finder, ImageFinder) else ImageFinder(finder)
    if not isinstance(doc["text_list"], list):
        raise ValueError("text_list must be a list")
    infos, members = [], {}
    for info in doc.get("image_info") or []:
        if isinstance(info, dict) and isinstance(info.get("image_base64"), str):
            infos.append(info)
            continue
        loaded = None
        if isinstance(info, dict):
            loaded = finder.load(info.get("image_name")) or finder.load(info.get("raw_url"))
        if loaded is None:
            counts["images_missing"] += 1
            continue
        name = f"{len(members)}.{loaded[1]}"
        members[name] = loaded[0]
        infos.append({**info, "member": name})
    return {**doc, "image_info": infos}, members


def has_text(doc: dict[str, Any]) -> bool:
    texts = doc.get("texts") if "texts" in doc else doc.get("text_list")
    return any(isinstance(t, str) and t.strip() for t in texts or [])


def convert(path: str | Path, out: str | Path, layout: str, images: str | Path | None = None,
            shard_size: int = 1000, image_map: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert one documents file of ``layout`` (``"obelics"`` or ``"mmc4"``: ``.jsonl``, ``.jsonl.zip`` or
    ``.parquet``) to shards; returns the summary.

    Args:
        path: the input file.
        out: output folder; must be empty unless ``overwrite`` (:mod:`datamodules.formats.outputs`).
        layout: ``"obelics"`` or ``"mmc4"``.
        images: folder that image paths are relative to (default: the input's folder), or an img2dataset download
            folder whose parquet maps image URLs to the downloaded files.
        shard_size: documents per shard.
        image_map: a url → file map (:mod:`datamodules.formats.downloads`), read before ``images``.
        overwrite: replace an earlier run's files in ``out``.
    """
    path = Path(path)
    if problem := input_problem(path):
        raise (IsADirectoryError if path.is_dir() else FileNotFoundError)(problem)
    check_output(out, overwrite)
    folder = Path(images) if images is not None else path.parent
    finder = ImageFinder(folder, url_images(folder, image_map))
    convert_one = obelics_document if layout == "obelics" else mmc4_document
    out = prepare_output(out, overwrite)
    writer, counts = ShardWriter(out, shard_size, "docs-"), Counter()
    try:
        for row in document_rows(path):
            try:
                if isinstance(row, Exception):
                    raise row
                doc, members = convert_one(row, finder, counts)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                counts["skipped_bad_line"] += 1
                continue
            if not has_text(doc):
                counts["skipped_no_text"] += 1
                continue
            counts["images"] += len(members)
            writer.write({"__key__": f"{writer.count:09d}", "json": json.dumps(doc, ensure_ascii=False).encode(),
                          **{name: data for name, data in members.items()}})
    finally:
        writer.close()
    summary = {"input": str(path), "layout": layout, "documents": writer.count, "shards": writer.shards,
               "urls": writer.url(), "url_images": None if finder.urls is None else finder.urls.source,
               **dict(sorted(counts.items()))}
    return write_summary(out, summary)


def convert_obelics(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-obelics``."""
    return convert(args.input, args.out, "obelics", args.images, args.shard_size, args.image_map, args.overwrite)


def convert_mmc4(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-mmc4``."""
    return convert(args.input, args.out, "mmc4", args.images, args.shard_size, args.image_map, args.overwrite)
