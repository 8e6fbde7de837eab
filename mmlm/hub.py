"""Telling a local path from a hub id, so a missing local directory is named instead of sent to the hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Keys of a transformers config's ``to_dict`` that are not architecture (``AutoConfig.for_model`` takes the rest).
CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "model_type", "dtype", "torch_dtype")


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` can only be a local path, not a hub id (``name`` or ``org/name``).

    True for absolute paths, paths starting with ``.``, paths of more than two parts
    (``data/shapes/tokenizer``) and paths whose first part exists here (``runs/export``).
    """
    text = str(name_or_path)
    parts = Path(text).parts
    return Path(text).is_absolute() or text.startswith(".") or len(parts) > 2 or (
        len(parts) > 1 and Path(parts[0]).exists())


def config_kwargs(config: Any, with_type: bool = True) -> dict[str, Any]:
    """A transformers config as ``{"model_type": …, **architecture}`` (``with_type=False``: without the type): what
    ``AutoConfig.for_model`` rebuilds it from (a part's ``config`` argument, without reading any weights)."""
    kwargs = {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOISE}
    return {"model_type": config.model_type, **kwargs} if with_type else kwargs


def require_local(name_or_path: str | Path, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and the path when a local-looking path does not exist."""
    if looks_local(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} does not exist (a local path: not a hub id). "
            "Create it first (e.g. `mmlm data synth-shapes` for the shapes tokenizer, the text-LM stage for its "
            "export) or point the config at another directory.")
