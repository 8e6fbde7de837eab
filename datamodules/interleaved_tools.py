"""``mmlm data convert-obelics | convert-mmc4 | synth-interleaved``: interleaved documents → shards.

Both converters read one document per jsonl line and write ``{out}/docs-{i:05d}.tar`` with samples
``{key}.json`` (the document in its own layout) + ``{key}.{j}.{ext}`` (each image found locally, the
reference in the JSON replaced by the member name ``"{j}.{ext}"``), plus ``{out}/summary.json``.

* OBELICS: ``{"texts": [...], "images": [...], ...}``; an image is a path (relative to ``--images``
  or the jsonl's folder), a ``data:image/…;base64,`` URI, or a URL. Images that are not available
  locally (URLs were never downloaded here) are removed with their position and counted.
* MMC4: ``{"text_list": [...], "image_info": [{"image_name", "matched_text_index", "matched_sim",
  "raw_url"}, ...], ...}``; ``image_name`` is looked up under ``--images``; an entry that already
  holds ``image_base64`` keeps it in the JSON (the reader decodes it). Missing images are removed.

A line that is not JSON, not in the layout, or has no text left is skipped and counted.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

from datamodules.shards import ShardWriter

IMAGE_TYPES = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``convert-obelics``, ``convert-mmc4`` and ``synth-interleaved`` to the ``mmlm data`` subparsers."""
    for name, layout in (("convert-obelics", "OBELICS (texts/images lists)"),
                         ("convert-mmc4", "MMC4 (text_list + image_info)")):
        tool = sub.add_parser(name, help=f"interleaved documents in the {layout} jsonl layout → shards")
        tool.add_argument("input", help="jsonl file, one document per line")
        tool.add_argument("--out", required=True, help="output directory")
        tool.add_argument("--images", default=None, help="folder of the documents' images (default: the jsonl's)")
        tool.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
        tool.set_defaults(run=convert_obelics if name == "convert-obelics" else convert_mmc4)
    synth = sub.add_parser("synth-interleaved", help="synthetic interleaved shapes documents for KOSMOS-1 (k-shot)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--docs", type=int, default=4000, help="interleaved documents")
    synth.add_argument("--val", type=int, default=150, help="validation queries")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    synth.set_defaults(run=synth_interleaved)


def synth_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Run the synthetic generator (pairs: docs / 2, text: docs / 4, support: max(50, val / 2))."""
    from datamodules.synthetic.interleaved import write_interleaved

    return write_interleaved(args.out, docs=args.docs, pairs=args.docs // 2, texts=args.docs // 4, val=args.val,
                             support=max(50, args.val // 2), seed=args.seed, shard_size=args.shard_size)


def load_image(ref: Any, folder: Path) -> tuple[bytes, str] | None:
    """``(bytes, ext)`` of a local path or data URI; ``None`` when not available here (URL, missing file)."""
    if not isinstance(ref, str) or not ref:
        return None
    if ref.startswith("data:image/") and ";base64," in ref:
        kind = ref[len("data:image/"):ref.index(";")]
        return base64.b64decode(ref.split(",", 1)[1]), IMAGE_TYPES.get(kind, "jpg")
    if "://" in ref:
        return None
    path = Path(ref) if Path(ref).is_absolute() else folder / ref
    if not path.is_file():
        return None
    return path.read_bytes(), IMAGE_TYPES.get(path.suffix.lower().lstrip("."), "jpg")


def obelics_document(doc: dict[str, Any], folder: Path, counts: Counter) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The document with local images as members (unavailable images removed and counted)."""
    texts, images = doc["texts"], doc["images"]
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise ValueError("texts/images must be lists of equal length")
    kept_texts, kept_images, members = [], [], {}
    for text, image in zip(texts, images):
        if image is None:
            kept_texts.append(text)
            kept_images.append(None)
            continue
        loaded = load_image(image, folder)
        if loaded is None:
            counts["images_missing"] += 1
            continue
        name = f"{len(members)}.{loaded[1]}"
        members[name] = loaded[0]
        kept_texts.append(None)
        kept_images.append(name)
    return {**doc, "texts": kept_texts, "images": kept_images}, members


def mmc4_document(doc: dict[str, Any], folder: Path, counts: Counter) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The document with local images as members, base64 ones kept, the rest removed and counted."""
    if not isinstance(doc["text_list"], list):
        raise ValueError("text_list must be a list")
    infos, members = [], {}
    for info in doc.get("image_info") or []:
        if isinstance(info, dict) and isinstance(info.get("image_base64"), str):
            infos.append(info)
            continue
        loaded = load_image(info.get("image_name") if isinstance(info, dict) else None, folder)
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
            shard_size: int = 1000) -> dict[str, Any]:
    """Convert one jsonl file of ``layout`` (``"obelics"`` or ``"mmc4"``) to shards; returns the summary."""
    path, out = Path(path), Path(out)
    folder = Path(images) if images is not None else path.parent
    convert_one = obelics_document if layout == "obelics" else mmc4_document
    out.mkdir(parents=True, exist_ok=True)
    writer, counts = ShardWriter(out, shard_size, "docs-"), Counter()
    writer.remove_stale()
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                doc, members = convert_one(json.loads(line), folder, counts)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                counts["skipped_bad_line"] += 1
                continue
            if not has_text(doc):
                counts["skipped_no_text"] += 1
                continue
            counts["images"] += len(members)
            writer.write({"__key__": f"{writer.count:09d}", "json": json.dumps(doc).encode(),
                          **{name: data for name, data in members.items()}})
    finally:
        writer.close()
    summary = {"input": str(path), "layout": layout, "documents": writer.count, "shards": writer.shards,
               "urls": writer.url(), **dict(sorted(counts.items()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def convert_obelics(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-obelics``."""
    return convert(args.input, args.out, "obelics", args.images, args.shard_size)


def convert_mmc4(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-mmc4``."""
    return convert(args.input, args.out, "mmc4", args.images, args.shard_size)
