"""Raw data sets read like shards: official files and folders served to webdataset as chunk urls.

A raw source is an index file — a VQAv2/OK-VQA or GQA questions JSON (+ VQA annotations), a COCO captions
JSON, a Karpathy split file, a LAVIS caption list, a captions jsonl/tsv, a LAION / img2dataset parquet (images from
an img2dataset download folder), a Donut ``metadata.jsonl`` — or a plain image folder,
with the folder of its images. Its entries are cut into consecutive chunks; chunk ``[start, end)`` has the
url ::

    mmlm-raw://<format>?path=…&images=…&annotations=…&split=…&image_pattern=…&start=…&end=…

and :func:`open_url` (the opener that ``ImageTextDataModule`` and ``DocumentDataModule`` pass to their pipelines;
nothing is registered globally) serves it as an in-memory tar of the chunk's samples. These are the samples the converters write into shards,
built by the same functions (:func:`datamodules.formats.converters.item_sample`,
:func:`datamodules.tools.make_shards.record_problem`, :func:`datamodules.formats.donut_folder.raw_sample`): same keys, same
``jpg`` bytes, same ``json`` member. So raw files get the rank/worker split, shuffling, mixing, skip counts
and exact resume of shards, and give the same batches.

An entry a converter leaves out (missing image file, question without annotation, bad line…) becomes a
sample with only a ``skip`` member (``reason<TAB>detail``); the example builders call
:func:`raise_if_skipped`, so it is counted under the converter's reason instead of silently dropped.

The index is read once per process (:func:`load_index`, cached by the spec and the files' size and
modification time): the main process reads it to count the chunks, DataLoader workers forked from it
inherit that copy, a spawned worker reads it once. See ``docs/data-formats.md``.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from datamodules.formats.captions import Record, coco_records, lavis_records, read_records, record_problem
from datamodules.formats.converters import (
    IMAGE_CACHE,
    VQA_IMAGE_PATTERN,
    Item,
    gqa_items,
    image_member,
    item_sample,
    karpathy_items,
    load_json,
    vqav2_items,
)
from datamodules.formats.donut_folder import (
    METADATA,
    MetadataLine,
    image_extension,
    raw_sample,
    read_metadata,
)
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.streams import open_shard

SCHEME = "mmlm-raw"
Sample = dict[str, Any]

#: Formats of image–text sources, by the kinds that may read them.
VQA_FORMATS = ("vqav2", "gqa")
CAPTION_FORMATS = ("coco", "karpathy", "lavis", "folder-jsonl", "folder-tsv", "parquet")
#: Formats of document (Donut) sources.
FOLDER_FORMATS = ("donut-folder", "image-folder")
FORMATS = (*VQA_FORMATS, *CAPTION_FORMATS, *FOLDER_FORMATS)
#: File name endings that make a source raw without ``format``.
RAW_SUFFIXES = (".json", ".jsonl", ".tsv", ".parquet")
#: Image files of a plain image folder (by extension, case-insensitive).
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
LAYOUTS = ("a VQAv2/OK-VQA questions file {'questions': [{'image_id', 'question', 'question_id'}, …]}, "
           "a COCO captions file {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}, "
           "a Karpathy split file {'images': [{'filename', 'split', 'sentences': [{'raw'}]}]}, "
           "a LAVIS caption list [{'image', 'caption': str or [str, …], 'image_id'?}, …] "
           "or a GQA questions file {question_id: {'imageId', 'question', …}}")


@dataclass(frozen=True)
class RawSpec:
    """How to read one raw data set; hashable, it keys the per-process index cache.

    Attributes:
        format: one of :data:`FORMATS`, or ``"auto"``: from the file name (``.jsonl``, ``.tsv``, a folder) or,
            for a ``.json``, from its layout (:func:`json_layout`).
        path: the index file, or the folder of a Donut / image folder.
        images: folder the entries' image paths are relative to (``None``: the index file's folder, for
            captions jsonl/tsv only).
        annotations: VQA annotations file (``None``: no answers, e.g. test-dev).
        split: Karpathy split(s) (``"train"`` = train + restval, a tuple = exactly those; default ``"test"``), or
            the ``{split}`` of a VQA ``image_pattern`` (default: the questions file's ``data_subtype``).
        image_pattern: VQA image file name with ``{split}`` and ``{image_id}`` (default
            :data:`~datamodules.formats.converters.VQA_IMAGE_PATTERN`).
    """

    format: str
    path: str
    images: str | None = None
    annotations: str | None = None
    split: str | tuple[str, ...] | None = None
    image_pattern: str | None = None

    def url(self, start: int, end: int) -> str:
        """The url of entries ``[start, end)``."""
        fields = [(name, getattr(self, name)) for name in ("path", "images", "annotations", "image_pattern")]
        query = [(name, value) for name, value in fields if value is not None]
        if isinstance(self.split, str):
            query.append(("split", self.split))
        elif self.split is not None:
            query += [("splits", s) for s in self.split]
        return f"{SCHEME}://{self.format}?{urllib.parse.urlencode([*query, ('start', start), ('end', end)])}"

    @classmethod
    def parse(cls, url: str) -> tuple[RawSpec, int, int]:
        """``(spec, start, end)`` of a :meth:`url`."""
        parts = urllib.parse.urlparse(url)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)

        def one(name: str) -> str | None:
            return query[name][0] if name in query else None

        split = one("split") if "split" in query else tuple(query["splits"]) if "splits" in query else None
        spec = cls(parts.netloc, str(one("path")), one("images"), one("annotations"), split, one("image_pattern"))
        return spec, int(str(one("start"))), int(str(one("end")))


def is_raw(urls: Any, format: str | None) -> bool:
    """Whether a source with these ``urls`` and ``format`` is read raw (else it is shards)."""
    if format is not None:
        return format != "shards"
    return isinstance(urls, str) and urls.lower().endswith(RAW_SUFFIXES)


def path_problem(value: str | None, folder: bool) -> str | None:
    """Why the file (or, with ``folder``, the folder) ``value`` cannot be read; ``None`` when it can or is unset."""
    if value is None:
        return None
    path = Path(value)
    if folder and not path.is_dir():
        return "no such folder" if not path.exists() else "not a folder"
    if not folder and not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    return None


def spec_problem(spec: RawSpec) -> str | None:
    """The first unreadable path of ``spec``, named with its field; ``None`` when all exist."""
    fields = (("path", spec.path, spec.format in FOLDER_FORMATS), ("annotations", spec.annotations, False),
              ("images", spec.images, True))
    for name, value, folder in fields:
        if problem := path_problem(value, folder):
            return f"raw source {name} {value!r}: {problem}"
    return None


# --------------------------------------------------------------------------- indexes


class RawIndex(Protocol):
    """The entries of one raw data set: their count and the samples of a range."""

    format: str

    def __len__(self) -> int: ...

    def samples(self, start: int, end: int) -> Iterator[Sample]:
        """The raw samples of entries ``[start, end)`` (keys ``f"{i:09d}"``, or the metadata line for Donut)."""
        ...


def skip_sample(index: int, reason: str, detail: str) -> Sample:
    """A sample that stands for an unusable entry: only a ``skip`` member, ``reason<TAB>detail``."""
    return {"__key__": f"{index:09d}", "skip": f"{reason}\t{detail}".encode()}


def raise_if_skipped(sample: Sample) -> None:
    """Raise :class:`SkipSample` with the reason of a :func:`skip_sample` (nothing for other samples)."""
    data = sample.get("skip")
    if data is not None:
        reason, _, detail = data.decode("utf-8", errors="replace").partition("\t")
        raise SkipSample(reason, detail)


#: An :class:`~datamodules.formats.converters.Item` packed as ``(image path, json.dumps(meta), text, skip, detail)``.
PackedItem = tuple[str, bytes, "str | None", str, str]


def pack(item: Item) -> PackedItem:
    """A compact form of ``item``: about a third of its memory (the 10 VQA answers as one bytes object)."""
    return str(item.image), json.dumps(item.meta, ensure_ascii=False).encode("utf-8"), item.text, item.skip, item.detail


def unpack(row: PackedItem) -> Item:
    """The :class:`Item` of a :func:`pack` row (JSON keeps key order and values: the same ``json`` member)."""
    image, meta, text, skip, detail = row
    return Item(Path(image), json.loads(meta), text, skip, detail)


@dataclass
class ItemIndex:
    """Converter items (VQAv2/OK-VQA, GQA, Karpathy), packed: the samples ``convert_*`` writes."""

    format: str
    rows: list[PackedItem]

    @classmethod
    def of(cls, format: str, items: Iterable[Item]) -> ItemIndex:
        """The index of ``items`` (packed one by one)."""
        return cls(format, [pack(item) for item in items])

    def __len__(self) -> int:
        return len(self.rows)

    def samples(self, start: int, end: int) -> Iterator[Sample]:
        read = functools.lru_cache(maxsize=IMAGE_CACHE)(image_member)  # consecutive questions share images
        for index in range(start, end):
            sample, reason, detail = item_sample(unpack(self.rows[index]), read, index)
            yield sample if sample is not None else skip_sample(index, reason, detail)


@dataclass
class RecordIndex:
    """Caption records (COCO captions, captions jsonl/tsv): the samples ``make_shards`` writes."""

    format: str
    records: list[Record]
    image_root: Path

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, start: int, end: int) -> Iterator[Sample]:
        for index in range(start, end):
            sample, reason, detail = record_problem(self.records[index], self.image_root, index)
            yield sample if sample is not None else skip_sample(index, reason, detail)


@dataclass
class DonutIndex:
    """The lines of a Donut folder's ``metadata.jsonl``: the samples ``convert-donut`` writes."""

    folder: Path
    lines: list[MetadataLine]
    format: str = "donut-folder"

    def __len__(self) -> int:
        return len(self.lines)

    def samples(self, start: int, end: int) -> Iterator[Sample]:
        for record in self.lines[start:end]:
            yield raw_sample(self.folder, record)


@dataclass
class ImageFolderIndex:
    """The images of a plain folder (sorted by name): ``{image ext, "json": {"file_name"}}`` each, no ground truth."""

    folder: Path
    names: list[str]
    format: str = "image-folder"

    def __len__(self) -> int:
        return len(self.names)

    def samples(self, start: int, end: int) -> Iterator[Sample]:
        for index in range(start, end):
            name, key = self.names[index], f"{index:09d}"
            path = self.folder / name
            if not path.is_file():
                yield skip_sample(index, "missing_image", str(path))
                continue
            yield {"__key__": key, image_extension(name): path.read_bytes(),
                   "json": json.dumps({"file_name": name}, ensure_ascii=False).encode("utf-8")}


def folder_images(folder: Path) -> list[str]:
    """The image files directly in ``folder`` (by extension), sorted by name."""
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and p.is_file())


def file_format(path: str) -> str:
    """The format a file name implies: ``folder-jsonl``, ``folder-tsv``, ``json`` (layout read from the content),
    ``donut-folder`` / ``image-folder`` for a folder; ``ValueError`` naming the file otherwise."""
    if Path(path).is_dir():
        return "donut-folder" if (Path(path) / METADATA).is_file() else "image-folder"
    suffixes = {".jsonl": "folder-jsonl", ".tsv": "folder-tsv", ".json": "json", ".parquet": "parquet"}
    found = suffixes.get(Path(path).suffix.lower())
    if found is None:
        raise ValueError(f"cannot tell the format of raw source {path!r}: expected a .json ({LAYOUTS}), a captions "
                         f".jsonl, .tsv or .parquet, or set format to one of {FORMATS}")
    return found


def captioned(annotations: Any) -> bool:
    """Whether ``annotations`` is a list of COCO caption annotations (not boxes or keypoints)."""
    return isinstance(annotations, list) and all(isinstance(a, dict) and "caption" in a for a in annotations[:10])


def lavis_list(data: Any) -> bool:
    """Whether ``data`` is a LAVIS caption list: a JSON array of objects with ``image`` and ``caption``."""
    head = data[:10] if isinstance(data, list) else []
    return bool(head) and all(isinstance(row, dict) and "image" in row and "caption" in row for row in head)


def json_layout(data: Any, path: str) -> str:
    """The format of a parsed JSON index file: ``vqav2``, ``coco``, ``karpathy``, ``lavis`` or ``gqa``.

    Raises:
        ValueError: none of these layouts, naming the file, its top-level keys and the layouts expected.
    """
    if lavis_list(data):
        return "lavis"
    if isinstance(data, dict):
        images = data.get("images")
        if isinstance(data.get("questions"), list):
            return "vqav2"
        if isinstance(images, list) and captioned(data.get("annotations")):
            return "coco"
        if isinstance(images, list) and any(isinstance(i, dict) and "sentences" in i for i in images[:10]):
            return "karpathy"
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
    keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
    vqa_annotations = isinstance(data, dict) and "annotations" in data and "images" not in data
    hint = " (a VQA annotations file goes under annotations, beside its questions file)" if vqa_annotations else ""
    raise ValueError(f"raw source {path!r} has an unknown layout (top level: {keys}){hint}; expected {LAYOUTS}")


def need_images(spec: RawSpec, layout: str) -> str:
    """``spec.images``; ``ValueError`` naming the file when a layout that needs it has none."""
    if spec.images is None:
        raise ValueError(f"raw source {spec.path!r} is a {layout} file: set images to the folder of its images")
    return spec.images


def refuse_fields(spec: RawSpec, layout: str) -> None:
    """``ValueError`` for a field of ``spec`` that ``layout`` does not use (naming the field and the file)."""
    unused = {"annotations": layout != "vqav2", "image_pattern": layout != "vqav2",
              "split": layout not in ("vqav2", "karpathy")}
    for name, refused in unused.items():
        if refused and getattr(spec, name) is not None:
            raise ValueError(f"raw source {spec.path!r} is a {layout} file, which takes no {name} "
                             f"(got {getattr(spec, name)!r})")


def json_index(spec: RawSpec, data: Any, layout: str) -> RawIndex:
    """The index of a parsed JSON file of ``layout``."""
    refuse_fields(spec, layout)
    images = need_images(spec, layout)
    if layout == "coco":
        return RecordIndex("coco", list(coco_records(data)), Path(images))
    if layout == "lavis":
        return RecordIndex("lavis", list(lavis_records(data)), Path(images))
    if layout == "gqa":
        return ItemIndex.of("gqa", gqa_items(data, spec.path, images)[0])
    if layout == "karpathy":
        return ItemIndex.of("karpathy", karpathy_items(data, spec.path, images, spec.split or "test")[0])
    if spec.split is not None and not isinstance(spec.split, str):
        raise ValueError(f"raw source {spec.path!r}: a VQA split is one name (the {{split}} of image_pattern), "
                         f"got {spec.split!r}")
    items = vqav2_items(data, spec.path, spec.annotations, images, spec.image_pattern or VQA_IMAGE_PATTERN,
                        spec.split)[0]
    return ItemIndex.of("vqav2", items)


def open_index(spec: RawSpec) -> RawIndex:
    """Read the index of ``spec`` (uncached; see :func:`load_index`).

    Raises:
        FileNotFoundError: a path of the spec does not exist (named with its field).
        ValueError: unknown format or layout, a layout that contradicts ``format``, a missing ``images`` or a
            field the layout does not take.
    """
    if problem := spec_problem(spec):
        raise FileNotFoundError(problem)
    fmt = file_format(spec.path) if spec.format == "auto" else spec.format
    if fmt == "donut-folder":
        return DonutIndex(Path(spec.path), read_metadata(spec.path))
    if fmt == "image-folder":
        return ImageFolderIndex(Path(spec.path), folder_images(Path(spec.path)))
    if fmt in ("folder-jsonl", "folder-tsv", "parquet"):
        refuse_fields(spec, fmt)
        root = Path(spec.images) if spec.images is not None else Path(spec.path).parent
        return RecordIndex(fmt, read_records(Path(spec.path), fmt, root), root)
    data = load_json(spec.path, "raw source file")
    layout = json_layout(data, spec.path)
    if fmt not in ("json", layout):
        raise ValueError(f"raw source {spec.path!r} is a {layout} file, not {fmt} (its format field)")
    return json_index(spec, data, layout)


def stamp(spec: RawSpec) -> tuple[Any, ...]:
    """``(size, mtime)`` of the spec's files (and a folder's ``metadata.jsonl``): a changed file is read again."""
    paths = [spec.path, spec.annotations, str(Path(spec.path) / METADATA)]
    stats = [Path(p).stat() if p is not None and Path(p).exists() else None for p in paths]
    return tuple(None if s is None else (s.st_size, s.st_mtime_ns) for s in stats)


@functools.lru_cache(maxsize=16)
def _cached_index(spec: RawSpec, stamp: tuple[Any, ...]) -> RawIndex:
    return open_index(spec)


def load_index(spec: RawSpec) -> RawIndex:
    """The index of ``spec``, read once per process (while its files are unchanged)."""
    return _cached_index(spec, stamp(spec))


# --------------------------------------------------------------------------- chunk urls and the scheme


def chunk_urls(spec: RawSpec, size: int, chunks: int) -> list[str]:
    """Urls of ``chunks`` (at most ``size``) consecutive, nearly equal chunks of ``size`` entries."""
    count = max(1, min(chunks, size))
    bounds = [round(i * size / count) for i in range(count + 1)]
    return [spec.url(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def samples_tar(samples: Iterable[Sample]) -> bytes:
    """An in-memory tar of raw samples: member ``{key}.{ext}`` per non-``__`` field, as a shard holds them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def open_chunk(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BytesIO:
    """webdataset ``gopen`` handler of ``mmlm-raw://`` urls: the chunk's samples as a tar stream."""
    spec, start, end = RawSpec.parse(url)
    index = load_index(spec)
    return io.BytesIO(samples_tar(index.samples(start, min(end, len(index)))))



def open_url(url: str) -> IO[bytes]:
    """A shard url's byte stream: a raw chunk (``mmlm-raw://…``, :func:`open_chunk`) or anything webdataset opens.
    The datamodules that read raw files pass it to their pipelines (``WebDataModule.opener``)."""
    return open_chunk(url) if url.startswith(f"{SCHEME}://") else open_shard(url)


@dataclass(frozen=True)
class Chunked:
    """A source whose raw files are read as chunk ``urls``; every other attribute is the source's own."""

    source: Any
    urls: list[str]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("source", "urls"):
            raise AttributeError(name)
        return getattr(self.source, name)


def chunked(source: Any, spec: RawSpec, needed: int, chunk: int) -> Chunked:
    """``source`` read through chunk urls: ``ceil(entries / chunk)`` chunks, but at least ``needed`` (ranks ×
    workers) so every rank and worker gets one.

    Raises:
        ValueError: the index has no entries (named).
    """
    index = load_index(spec)
    if len(index) == 0:
        raise ValueError(f"raw source {spec.path!r} ({index.format}) has no entries")
    return Chunked(source, chunk_urls(spec, len(index), max(needed, -(-len(index) // chunk))))
