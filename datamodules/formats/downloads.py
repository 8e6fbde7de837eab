"""Images given by URL, found locally: an img2dataset download folder or a url → file map.

Web-scale sets (LAION metadata, OBELICS documents, MMC4's ``raw_url``) name their images by URL; mmlm never
downloads. Download them once with `img2dataset <https://github.com/rom1504/img2dataset>`_ and point the tools at
its output folder, or give a map file:

* **img2dataset output folder** (``output_format`` ``files`` or ``webdataset``): per shard ``{shard}.parquet``, whose
  rows carry ``url``, ``key`` and ``status`` (``"success"`` for a downloaded image), beside ``{shard}/{key}.jpg``
  (``files``) or ``{shard}.tar`` with member ``{key}.jpg`` (``webdataset``). Without parquet files, the per-sample
  ``{key}.json`` files (``url``, ``key``, ``status``) are read instead. Rows whose status is not ``success`` have no
  image.
* **map file**: a JSON object ``{url: path}``, a ``.jsonl``/``.parquet`` with ``url`` and ``path`` (or ``file``)
  per row, or a ``.tsv`` of ``url<TAB>path`` lines; relative paths are relative to the map's folder.

:class:`UrlImages` holds the map (about 150 bytes per image) and reads an image's bytes on demand.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: img2dataset's status of a downloaded image.
SUCCESS = "success"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class ImageLocation:
    """Where an image's bytes are: a whole file (``size == -1``) or ``size`` bytes at ``offset`` of a tar (whose
    member is ``name``)."""

    path: str
    offset: int = 0
    size: int = -1
    name: str = ""

    def read(self) -> bytes:
        """The image's bytes (``FileNotFoundError`` when the file is gone)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    @property
    def suffix(self) -> str:
        """The image's extension without the dot, lower case (``jpg``)."""
        return Path(self.name or self.path).suffix.lstrip(".").lower() or "jpg"


PARQUET_MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """Whether ``path`` is a parquet file (by its first bytes, whatever its name)."""
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file as dicts (only ``columns`` present in its schema, all when ``None``)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    wanted = None if columns is None else [c for c in columns if c in names]
    for batch in file.iter_batches(columns=wanted, batch_size=4096):
        yield from batch.to_pylist()


def downloaded(row: dict[str, Any]) -> bool:
    """Whether an img2dataset row describes a downloaded image (``status`` success, or no status column)."""
    status = row.get("status")
    return status is None or status == SUCCESS


def tar_members(path: Path) -> dict[str, ImageLocation]:
    """``{key: location}`` of the image members of an img2dataset ``webdataset`` shard."""
    found: dict[str, ImageLocation] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if member.isfile() and f".{ext.lower()}" in IMAGE_SUFFIXES:
                found.setdefault(Path(key).name, ImageLocation(str(path), member.offset_data, member.size, member.name))
    return found


def shard_images(folder: Path, shard: str) -> dict[str, ImageLocation]:
    """``{key: location}`` of one img2dataset shard: ``{shard}/{key}.jpg`` files or ``{shard}.tar`` members."""
    files = folder / shard
    if files.is_dir():
        return {p.stem: ImageLocation(str(p)) for p in files.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    tar = folder / f"{shard}.tar"
    return tar_members(tar) if tar.is_file() else {}


def is_download_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like img2dataset output (``*_stats.json`` or a ``*.parquet`` with ``url`` + ``key``)."""
    if not folder.is_dir():
        return False
    if any(folder.glob("*_stats.json")):
        return True
    for path in sorted(folder.glob("*.parquet"))[:1]:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
        return "url" in names and "key" in names
    return False


class UrlImages:
    """``url → ImageLocation`` of the images available locally (see the module docstring)."""

    def __init__(self, locations: dict[str, ImageLocation], source: str) -> None:
        self.locations, self.source = locations, source

    def __len__(self) -> int:
        return len(self.locations)

    def get(self, url: Any) -> ImageLocation | None:
        """Where the image of ``url`` is, ``None`` when it was not downloaded."""
        return self.locations.get(url) if isinstance(url, str) else None

    @classmethod
    def from_download_folder(cls, folder: str | Path) -> UrlImages:
        """The images of an img2dataset output folder (its parquet files, else its per-sample json files)."""
        folder, locations = Path(folder), {}
        parquets = sorted(folder.glob("*.parquet"))
        for parquet in parquets:
            images = shard_images(folder, parquet.stem)
            for row in parquet_rows(parquet, ["url", "key", "status"]):
                if downloaded(row) and row.get("key") in images:
                    locations[row["url"]] = images[row["key"]]
        if not parquets:
            locations = json_sample_locations(folder)
        return cls(locations, str(folder))

    @classmethod
    def from_map(cls, path: str | Path) -> UrlImages:
        """The images of a map file (JSON object, jsonl/parquet rows with ``url`` + ``path``, or tsv)."""
        path = Path(path)
        pairs = list(map_pairs(path))
        root = path.parent
        return cls({url: ImageLocation(str(p if Path(p).is_absolute() else root / p)) for url, p in pairs}, str(path))


def json_sample_locations(folder: Path) -> dict[str, ImageLocation]:
    """``url → image`` from img2dataset's per-sample ``{key}.json`` files beside ``{key}.jpg`` (any depth)."""
    locations: dict[str, ImageLocation] = {}
    for meta in sorted(folder.rglob("*.json")):
        if meta.name.endswith("_stats.json"):
            continue
        try:
            row = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        image = next((meta.with_suffix(s) for s in IMAGE_SUFFIXES if meta.with_suffix(s).is_file()), None)
        if isinstance(row, dict) and isinstance(row.get("url"), str) and downloaded(row) and image is not None:
            locations[row["url"]] = ImageLocation(str(image))
    return locations


def map_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """``(url, path)`` pairs of a map file; ``ValueError`` naming the file for another layout."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        for line in path.read_text(encoding="utf-8").splitlines():
            url, sep, file = line.partition("\t")
            if sep and "://" in url:
                yield url.strip(), file.strip()
        return
    if suffix in (".jsonl", ".parquet"):
        rows = parquet_rows(path) if suffix == ".parquet" else (json.loads(x) for x in path.read_text().splitlines() if x.strip())
        for row in rows:
            file = row.get("path") or row.get("file")
            if isinstance(row.get("url"), str) and isinstance(file, str):
                yield row["url"], file
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"image map {str(path)!r}: expected a JSON object {{url: path}}, a .jsonl/.parquet with "
                         "url and path per row, or a .tsv of url<TAB>path lines")
    yield from ((url, file) for url, file in data.items() if isinstance(file, str))


def url_images(images: str | Path | None, image_map: str | Path | None = None) -> UrlImages | None:
    """The URL images of a tool's ``--image-map`` (first) or ``--images`` folder when it is an img2dataset output
    folder; ``None`` when neither gives any (URLs then count as missing images)."""
    if image_map is not None:
        return UrlImages.from_map(image_map)
    if images is not None and is_download_folder(Path(images)):
        return UrlImages.from_download_folder(images)
    return None
