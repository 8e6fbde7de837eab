"""Caption inputs, read: jsonl/tsv with image names, a COCO captions JSON, a LAVIS caption list (``coco_karpathy_*.json``),
a LAION / img2dataset parquet whose URL images come from an img2dataset download folder
(:mod:`datamodules.formats.downloads`) → :class:`Record` (file or url, captions, ``image_id``), and the shard sample
each record becomes (:func:`to_sample`, :func:`record_problem`). ``mmlm data make-shards``
(:mod:`datamodules.tools.make_shards`) writes these samples as shards; raw sources read the same records directly,
without shards (:mod:`datamodules.formats.raw`).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.formats.downloads import ImageLocation, UrlImages, is_parquet, parquet_rows, url_images
from datamodules.formats.outputs import InputError
from datamodules.pipeline.transforms import DECODE_ERRORS, MAX_IMAGE_PIXELS, to_rgb

FORMATS = ("folder-jsonl", "folder-tsv", "coco", "lavis", "parquet")
#: Input file endings and the format they imply (``.json`` is ``coco`` or ``lavis`` by its content).
SUFFIX_FORMATS = {".jsonl": "folder-jsonl", ".tsv": "folder-tsv", ".parquet": "parquet"}
TSV_HEADER_FIELDS = {"file", "file_name", "filename", "image", "path"}
#: Row fields holding the image file, the image URL, the caption(s) and the id (first present wins).
FILE_FIELDS = ("image", "file_name", "path")
URL_FIELDS = ("url", "URL")
CAPTION_FIELDS = ("captions", "caption", "TEXT", "txt", "text")
ID_FIELDS = ("image_id", "key", "SAMPLE_ID")
JPEG_QUALITY = 95
MAX_EXAMPLES = 20
#: COCO image file names (``COCO_val2014_000000184613.jpg``): the id is the number (LAVIS's evaluation rule).
COCO_NAME = re.compile(r"COCO_[a-z]+\d*_0*(\d+)$")


@dataclass
class Record:
    """One image and its captions read from an input (or a reason it cannot be used).

    Attributes:
        file_name: the image file, relative to the image root (or the image's URL for web images).
        captions: its captions, first = the sample's caption.
        image_id: the source's id of the image, with its type.
        skip: why the record cannot be used (``""``: usable).
        location: where a web image was downloaded to (:mod:`datamodules.formats.downloads`), ``None`` for files.
    """

    file_name: str
    captions: list[str]
    image_id: Any
    skip: str = ""
    location: ImageLocation | None = None


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(n, line)`` for every non-blank line of a UTF-8 text file, ``n`` counting all lines from 1."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield n, line


def first_field(row: dict[str, Any], fields: tuple[str, ...]) -> Any:
    """The value of the first of ``fields`` that ``row`` has and is not ``None``/empty."""
    return next((row[f] for f in fields if row.get(f) not in (None, "", [])), None)


def caption_list(value: Any) -> list[str]:
    """A caption field as a list of non-empty stripped strings (a string, or a list of them as LAVIS's eval files)."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [c.strip() for c in values if isinstance(c, str) and c.strip()]


def row_image_id(row: dict[str, Any], name: str, lavis: bool) -> Any:
    """The id of a row's image: its ``image_id`` / ``key`` / ``SAMPLE_ID``; else, for LAVIS lists, the number of a
    COCO file name (``…_000000184613.jpg`` → 184613, as LAVIS scores captions); else the file's stem or the URL."""
    if "image_id" in row:
        return row["image_id"]
    found = first_field(row, ID_FIELDS)
    if found is not None:
        return found
    stem = Path(name).stem
    match = COCO_NAME.search(stem) if lavis else None
    return int(match.group(1)) if match else stem if "://" not in name else name


def row_record(row: Any, where: str, lavis: bool = False, urls: UrlImages | None = None) -> Record:
    """The record of one JSON/parquet row: ``image``/``file_name``/``path`` (a file) or ``url``/``URL`` (a web image
    found through ``urls``), ``caption`` (a string or a list), ``captions``, ``TEXT`` or ``txt``, and an id."""
    if not isinstance(row, dict):
        return Record(where, [], "", skip="bad_jsonl_line")
    captions = caption_list(first_field(row, CAPTION_FIELDS))
    name, url = first_field(row, FILE_FIELDS), first_field(row, URL_FIELDS)
    if isinstance(name, str):
        return Record(name, captions, row_image_id(row, name, lavis))
    if isinstance(url, str):
        location = urls.get(url) if urls is not None else None
        return Record(url, captions, row_image_id(row, url, lavis), skip="" if location else "missing_image",
                      location=location)
    return Record(where, captions, "", skip="missing_file_name")


def json_array(path: Path) -> list[Any] | None:
    """The parsed file when it is one JSON array (a LAVIS caption list), else ``None``."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, list) else None


def read_jsonl(path: Path) -> Iterator[Record]:
    """Records of a jsonl file: ``{"image" | "file_name": …, "caption": … | "captions": […]}`` per line. A file that
    is one JSON array instead (LAVIS's ``coco_karpathy_*.json`` saved as ``.jsonl``) is read as :func:`read_lavis`."""
    rows = json_array(path)
    if rows is not None:
        yield from lavis_records(rows)
        return
    for n, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            yield Record(f"line {n}", [], "", skip="bad_jsonl_line")
            continue
        yield row_record(row, f"line {n}")


def lavis_records(rows: list[Any]) -> Iterator[Record]:
    """One record per entry of a LAVIS caption list (``{"image", "caption": str | [str, …], "image_id"?}``)."""
    for n, row in enumerate(rows):
        yield row_record(row, f"entry {n}", lavis=True)


def read_lavis(path: Path) -> Iterator[Record]:
    """Records of a LAVIS caption list: ``coco_karpathy_train.json`` (one entry per caption, ``image_id``
    ``"coco_…"``) or ``coco_karpathy_val/test.json`` (one entry per image, ``caption`` a list, no id: the COCO file
    name's number, as LAVIS's evaluation uses)."""
    rows = json_array(path)
    if rows is None:
        raise InputError(f"lavis input {str(path)!r} is not a JSON array of {{'image', 'caption'}} entries")
    return lavis_records(rows)


def read_parquet(path: Path, urls: UrlImages | None) -> Iterator[Record]:
    """Records of a parquet file: one row per image, LAION metadata (``url``/``URL``, ``caption``/``TEXT``,
    ``key``/``SAMPLE_ID``) with its images found through ``urls`` (an img2dataset download folder), or rows with a
    local ``image``/``file_name``/``path``."""
    for n, row in enumerate(parquet_rows(path)):
        yield row_record(row, f"row {n}", urls=urls)


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


def input_format(path: Path) -> str:
    """The format of a captions input by its name (``.jsonl``, ``.tsv``, ``.parquet``) or, for ``.json``, its content
    (an array: ``lavis``; an object: ``coco``); ``ValueError`` naming the file otherwise."""
    found = "parquet" if is_parquet(path) else SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None and path.suffix.lower() == ".json":
        found = "lavis" if json_array(path) is not None else "coco"
    if found is None:
        raise InputError(f"cannot tell the format of {str(path)!r}: expected a .jsonl, .tsv, .parquet or a COCO / "
                         f"LAVIS .json, or pass --format (one of {', '.join(FORMATS)})")
    return found


def input_problem(path: Path, fmt: str | None) -> Exception | None:
    """Why ``path`` cannot be a captions input of ``fmt`` — an unknown format (:class:`InputError`), a folder
    (``IsADirectoryError``), a missing file (``FileNotFoundError``), a parquet file under another format — else
    ``None``."""
    if fmt is not None and fmt not in FORMATS:
        return InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if path.is_dir():
        return IsADirectoryError(
            f"input {str(path)!r} is a folder: expected a captions file (.jsonl or .tsv with image names, a COCO or "
            "LAVIS caption .json, a LAION/img2dataset .parquet); images go to --images, shards need no conversion")
    if not path.is_file():
        return FileNotFoundError(f"input {str(path)!r}: no such file")
    if fmt not in (None, "parquet") and is_parquet(path):
        return InputError(f"input {str(path)!r} is a parquet file, not {fmt}: pass --format parquet (or leave "
                          "--format out)")
    return None


def read_records(path: Path, fmt: str | None, image_root: Path | None = None,
                 image_map: str | Path | None = None) -> list[Record]:
    """All records of ``path`` in format ``fmt`` (one of :data:`FORMATS`; ``None``: :func:`input_format`).

    ``image_root`` (default: the input's folder) is where image files are, and for ``parquet`` with URLs the
    img2dataset download folder (or ``image_map`` a url → file map, :mod:`datamodules.formats.downloads`).

    Raises:
        IsADirectoryError, FileNotFoundError, InputError: the input is a folder, missing, of an unknown format, or a
            parquet of URLs without a download folder or map (each named).
    """
    if (problem := input_problem(path, fmt)) is not None:
        raise problem
    fmt = fmt or input_format(path)
    if fmt != "parquet":
        readers = {"folder-jsonl": read_jsonl, "folder-tsv": read_tsv, "coco": read_coco, "lavis": read_lavis}
        return list(readers[fmt](path))
    root = image_root if image_root is not None else path.parent
    records = list(read_parquet(path, url_images(root, image_map)))
    if records and all(r.skip == "missing_image" and r.location is None for r in records):
        raise InputError(f"parquet input {str(path)!r} names its images by URL, and none is found locally: set "
                         "--images to the img2dataset download folder of these URLs (its *.parquet with url and "
                         "key beside the images), or --image-map to a url → file map")
    return records


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the aspect of ``width × height`` and at most ``max_pixels`` pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:
        w, h = (w - 1, h) if w * height >= h * width else (w, h - 1)
    return w, h


@dataclass
class Encoded:
    """An image as the JPEG bytes of a sample, its size, and the original size when it was downsized."""

    data: bytes
    width: int
    height: int
    original: tuple[int, int] | None = None


def encode_jpeg(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Encoded:
    """RGB JPEG bytes verbatim, anything else re-encoded as RGB JPEG; an image over ``max_pixels`` (which every
    reader would skip) is downsized to fit, keeping its aspect (JPEGs decoded at a reduced scale first).

    Raises:
        Image.DecompressionBombError: beyond Pillow's own limit (2 × ``Image.MAX_IMAGE_PIXELS``).
        OSError, ValueError…: (:data:`~datamodules.pipeline.transforms.DECODE_ERRORS`) it does not decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        too_large = max_pixels is not None and size[0] * size[1] > max_pixels
        if too_large:
            target = fit_size(*size, max_pixels)
            if image.format == "JPEG":
                image.draft("RGB", target)
            rgb = to_rgb(image).resize(target, Image.Resampling.LANCZOS)
        else:
            image.load()
            if image.format == "JPEG" and image.mode == "RGB":
                return Encoded(data, *size)
            rgb = to_rgb(image)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Encoded(buffer.getvalue(), rgb.width, rgb.height, size if too_large else None)


def jpeg_bytes(path: Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[bytes, int, int]:
    """``(jpeg bytes, width, height)`` of an image file (:func:`encode_jpeg`).

    Raises:
        FileNotFoundError: the file does not exist.
        OSError, ValueError…: (:data:`~datamodules.pipeline.transforms.DECODE_ERRORS`) it does not decode.
    """
    encoded = encode_jpeg(path.read_bytes(), max_pixels)
    return encoded.data, encoded.width, encoded.height


def to_sample(record: Record, image_root: Path, index: int, max_pixels: int | None = MAX_IMAGE_PIXELS
              ) -> dict[str, Any]:
    """The shard sample of ``record``; raises ``FileNotFoundError`` or a decode error for a bad image. A downsized
    image's original size is in the JSON (``original_width``/``original_height``) and in ``__downsized__``."""
    raw = record.location.read() if record.location is not None else (image_root / record.file_name).read_bytes()
    encoded = encode_jpeg(raw, max_pixels)
    key = f"{index:09d}"
    meta = {"key": key, "caption": record.captions[0], "captions": record.captions, "image_id": record.image_id,
            "file_name": record.file_name, "width": encoded.width, "height": encoded.height}
    if encoded.original is not None:
        meta["original_width"], meta["original_height"] = encoded.original
    sample = {"__key__": key, "jpg": encoded.data, "txt": record.captions[0].encode("utf-8"),
              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if encoded.original is not None:
        sample["__downsized__"] = {"item": record.file_name, "from": list(encoded.original),
                                   "to": [encoded.width, encoded.height]}
    return sample


def record_problem(record: Record, image_root: Path, index: int, max_pixels: int | None = MAX_IMAGE_PIXELS
                   ) -> tuple[dict[str, Any] | None, str, str]:
    """``(sample, "", "")`` for a usable record, else ``(None, reason, detail)``."""
    if record.skip:
        return None, record.skip, record.file_name
    if not record.captions:
        return None, "missing_caption", record.file_name
    try:
        return to_sample(record, image_root, index, max_pixels), "", ""
    except FileNotFoundError:
        return None, "missing_image", record.file_name
    except Image.DecompressionBombError as exn:
        return None, "image_too_large", f"{record.file_name}: {exn}"
    except DECODE_ERRORS as exn:
        return None, "bad_image", f"{record.file_name}: {exn!r}"
