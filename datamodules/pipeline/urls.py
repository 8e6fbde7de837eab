"""Shard urls: expanding patterns into shard lists, refusing folders and missing files, naming sources in messages.

A source's ``urls`` is a brace pattern (``"data/{00000..00009}.tar"``; ``::`` joins patterns), a local glob
(``"data/train/vqa-*.tar"``, sorted), a ``scheme://`` or ``pipe:`` url, or a list of those (:func:`expand_urls`).
A local folder is never read as a shard: it is refused with the patterns that would name its shards
(:func:`folder_problem`), because reading a folder as a tar used to yield nothing, forever. Messages name a source
by its pattern or file (:func:`describe_urls`, :func:`url_name`: the ``path`` of a raw chunk url); when sources are
mixed, each sample's key is prefixed by its source's label (:func:`source_labels`), so equal keys of different sets
stay apart in logs and batches. See ``docs/data-formats.md``.
"""

from __future__ import annotations

import glob
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import webdataset as wds


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand shard patterns into a list of shards.

    A pattern is a brace pattern (``"data/{00000..00009}.tar"``; ``::`` joins patterns) or a
    local glob (``"data/train/vqa-*.tar"``, sorted); a list holds several patterns.

    Raises:
        FileNotFoundError: a glob matches no file.
        FolderAsShardError: a pattern is a local folder (:func:`folder_problem` names the patterns of its shards).
    """
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    return [u for pattern in patterns for u in _expand_one(pattern)]


def _expand_one(pattern: str) -> list[str]:
    """One brace pattern or local glob → shard list; a local folder is refused (:func:`folder_problem`)."""
    if "://" not in pattern and not pattern.startswith("pipe:") and Path(pattern).is_dir():
        raise FolderAsShardError(folder_problem(Path(pattern)))
    if "://" in pattern or pattern.startswith("pipe:") or not any(c in pattern for c in "*?["):
        return wds.shardlists.expand_urls(pattern)
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    return matches


class FolderAsShardError(IsADirectoryError, ValueError):
    """A folder given where shard urls were expected (an ``OSError`` for the CLI tools, a ``ValueError`` for configs)."""


def shard_families(folder: Path) -> dict[str, int]:
    """The ``*.tar`` files directly in ``folder`` grouped by name without digits: ``{"vqa-*.tar": 2, "*.tar": 3}``."""
    families: dict[str, int] = {}
    for path in sorted(folder.glob("*.tar")):
        family = re.sub(r"\d+", "*", path.stem) + ".tar"
        families[family] = families.get(family, 0) + 1
    return families


def folder_problem(folder: Path) -> str:
    """Why a folder cannot be a shard url, with the patterns that would name its shards.

    A folder is never expanded implicitly: it may hold shards of several kinds (``captions-*.tar`` beside
    ``vqa-*.tar``) or stale ones, and reading a folder as a tar used to yield nothing, forever.
    """
    families = shard_families(folder)
    if families:
        shown = ", ".join(f"{str(folder / name)!r} ({n} shard{'s' * (n > 1)})" for name, n in families.items())
        return f"{str(folder)!r} is a folder, not a shard: name its shards with a pattern, e.g. {shown}"
    below = sorted({p.parent.relative_to(folder).as_posix() for p in folder.glob("*/*.tar")})
    hint = f"; its subfolders {', '.join(f'{b}/' for b in below[:5])} hold shards" if below else ""
    return f"{str(folder)!r} is a folder without *.tar shards{hint}: name the shards with a pattern"


def check_local_shards(urls: list[str]) -> None:
    """Raise ``FileNotFoundError`` naming local shards (no ``scheme://`` or ``pipe:``) that do not exist."""
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist: {shown}")


def describe_urls(urls: str | Sequence[str]) -> str:
    """A short name of a source's urls for messages: the pattern, or the first url (a raw chunk's file) and a count."""
    if isinstance(urls, str):
        return url_name(urls)
    items = [str(u) for u in urls]
    if not items:
        return "[]"
    names = list(dict.fromkeys(url_name(u) for u in items))
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(items) - 1} more)"


def url_name(url: str) -> str:
    """The file a url reads: its path, or the ``path`` of a raw chunk (``mmlm-raw://fmt?path=…``)."""
    if "://" in url:
        parts = urllib.parse.urlparse(url)
        path = urllib.parse.parse_qs(parts.query).get("path")
        if path:
            return path[0]
    return url


def source_labels(sources: Sequence[str | Sequence[str]]) -> list[str]:
    """Short, distinct labels of mixed sources (the pattern's file name without ``.tar``: ``vqa-*``,
    ``dataset_coco.json``); the parent folder is added where names coincide, then the index."""
    names = [Path(describe_urls(s).split(" (+")[0]) for s in sources]
    labels = [n.name.removesuffix(".tar") for n in names]
    if len(set(labels)) < len(labels):
        labels = [f"{n.parent.name}/{label}" for n, label in zip(names, labels)]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i}" for i, label in enumerate(labels)]
    return labels
