"""Telling a local path from a hub id, so a missing local directory is named instead of sent to the hub."""

from __future__ import annotations

from pathlib import Path


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` can only be a local path, not a hub id (``name`` or ``org/name``).

    True for absolute paths, paths starting with ``.``, paths of more than two parts
    (``data/shapes/tokenizer``) and paths whose first part exists here (``runs/export``).
    """
    text = str(name_or_path)
    parts = Path(text).parts
    return Path(text).is_absolute() or text.startswith(".") or len(parts) > 2 or (
        len(parts) > 1 and Path(parts[0]).exists())


def require_local(name_or_path: str | Path, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and the path when a local-looking path does not exist."""
    if looks_local(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} does not exist (a local path: not a hub id). "
            "Create it first (e.g. `mmlm data synth-shapes` for the shapes tokenizer, the text-LM stage for its "
            "export) or point the config at another directory.")
