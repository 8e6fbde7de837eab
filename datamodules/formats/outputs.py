"""Output folders of the ``mmlm data`` tools: never clobber a file the tool did not write.

Every tool that writes a folder (``synth-*``, ``make-shards``, ``convert-*``, ``cache-features``, ``text-shards``)
goes through the functions here:

* :func:`check_output` before reading the inputs (nothing changed), :func:`prepare_output` before writing: a missing
  or empty folder is created; a folder holding files is refused (:class:`OutputExistsError`) unless ``overwrite``.
  With ``overwrite``, the files an earlier mmlm run listed under ``"files"`` in the folder's ``summary.json`` are
  removed, and nothing else: a folder that also holds files that run did not write (an img2dataset download,
  another tool's shards, a note) is refused as a whole, naming them, before anything is deleted.
* :func:`write_summary` at the end: writes ``summary.json`` with ``"files"``, the sorted relative paths of every file
  under the folder (the summary itself excepted) — exactly what the next ``overwrite`` may remove.

Single-file outputs (``vqa-answers --out answers.json``) use :func:`prepare_output_file`: an existing file is refused
unless ``overwrite``, which replaces that one file only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
#: Key of ``summary.json`` listing the files a run wrote (relative POSIX paths).
FILES = "files"
#: Files named in an error message.
SHOWN = 5


class OutputExistsError(FileExistsError):
    """An output folder or file holds something this run must not overwrite."""


class InputError(ValueError):
    """A data tool's input cannot be read as asked (a folder given for a file, an unknown format, URLs without a
    download folder); ``mmlm data`` prints it as one line, like the ``OSError`` path errors."""


def files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file (or link) under ``folder``, sorted; ``[]`` when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def recorded_files(folder: Path) -> set[str]:
    """The ``files`` an earlier run listed in ``folder/summary.json`` (plus the summary), ``set()`` without one."""
    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    listed = summary.get(FILES) if isinstance(summary, dict) else None
    if not isinstance(listed, list):
        return set()
    return {name for name in listed if isinstance(name, str) and safe_relative(name)} | {SUMMARY}


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a relative path inside its folder (no absolute path, no ``..``)."""
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def plural(n: int, word: str) -> str:
    """``"1 file"``, ``"3 files"``."""
    return f"{n} {word}{'s' * (n != 1)}"


def shown(names: list[str]) -> str:
    """The first :data:`SHOWN` names and how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def prepare_output(out: str | Path, overwrite: bool = False) -> Path:
    """Make ``out`` ready for a tool's run (see the module docstring); returns it as a ``Path``.

    Raises:
        OutputExistsError: see :func:`check_output` (nothing is deleted then).
    """
    out = Path(out)
    remove_files(out, check_output(out, overwrite))
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_output(out: str | Path, overwrite: bool = False) -> list[str]:
    """What :func:`prepare_output` would remove from ``out`` (nothing is changed): call it before reading a tool's
    inputs, so a refused folder is named before any work.

    Raises:
        OutputExistsError: ``out`` holds files and ``overwrite`` is false, or it holds files an earlier mmlm run did
            not list, or ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output folder {str(out)!r} is a file")
    present = files_under(out)
    if present and not overwrite:
        raise OutputExistsError(
            f"output folder {str(out)!r} is not empty ({plural(len(present), 'file')}: {shown(present)}); mmlm data never "
            "writes into a folder holding files: choose a new or empty --out, or pass --overwrite to replace an "
            f"earlier mmlm data run there (only the files its {SUMMARY} lists are removed)")
    foreign = [name for name in present if name not in recorded_files(out)]
    if foreign:
        raise OutputExistsError(
            f"output folder {str(out)!r} holds {plural(len(foreign), 'file')} that no earlier mmlm data run there wrote "
            f"(not listed in its {SUMMARY}): {shown(foreign)}; --overwrite removes only a run's own files, so "
            "choose another --out or move them away")
    return present


def remove_files(folder: Path, names: list[str]) -> None:
    """Delete ``names`` under ``folder``, then the sub-folders left empty (deepest first; ``folder`` is kept)."""
    for name in names:
        (folder / name).unlink()
    parents = {parent for name in names for parent in (folder / name).parents if folder in parent.parents}
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def write_summary(out: str | Path, summary: dict[str, Any], indent: int = 2) -> dict[str, Any]:
    """Write ``out/summary.json``: ``summary`` plus ``"files"`` (every file now under ``out``); returns ``summary``
    unchanged (the list is for the next ``overwrite``, not for printing)."""
    out = Path(out)
    recorded = {**summary, FILES: [name for name in files_under(out) if name != SUMMARY]}
    (out / SUMMARY).write_text(json.dumps(recorded, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def prepare_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Make ``path`` ready to be written as a single-file output: its folder created; an existing file refused unless
    ``overwrite`` (which replaces that file only).

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is false, or ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"output file {str(path)!r} is a folder: name a file, e.g. {str(path / 'out.json')!r}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output file {str(path)!r} exists: pass --overwrite to replace it, or choose another "
                                "--out")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
