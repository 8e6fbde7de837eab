"""Checks of a parsed ``data:`` config section that need the datamodule's own types, run before anything is built.

:func:`source_problem` builds every source entry (``Source``, ``MixSource``, ``DocumentSource``, …: any dataclass an
``__init__`` argument of the datamodule is a list of) from its parsed dict, so a wrong ``kind``, ``format`` or a raw
field on shards is named with its key (``data.init_args.train[0]: Source kind 'captions' is not one of …``) instead of
surfacing as nested tracebacks when the datamodule is instantiated. Used by :func:`mmlm.app.reliability.config_problem`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Iterator
from typing import Any


def import_class(class_path: str) -> type | None:
    """The class named by ``class_path`` (``pkg.module.Class``), ``None`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a type hint such as ``list[Source] | None``, ``None`` when there is none."""
    if dataclasses.is_dataclass(hint) and inspect.isclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if (found := dataclass_in(arg)) is not None:
            return found
    return None


def source_arguments(cls: type) -> dict[str, type]:
    """``{argument name: source dataclass}`` of a datamodule's ``__init__`` (e.g. ``train`` → ``Source``)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        return {}
    return {name: found for name, hint in hints.items() if (found := dataclass_in(hint)) is not None}


def source_entries(init_args: dict[str, Any], arguments: dict[str, type]) -> Iterator[tuple[str, type, Any]]:
    """``(key suffix, dataclass, entry)`` of every source entry given for the datamodule's source arguments."""
    for name, source_cls in arguments.items():
        value = init_args.get(name)
        entries = value if isinstance(value, list) else [] if value is None else [value]
        for i, entry in enumerate(entries):
            suffix = f"{name}[{i}]" if isinstance(value, list) else name
            yield suffix, source_cls, entry


def build_problem(source_cls: type, entry: Any) -> str | None:
    """Why ``source_cls(**entry)`` fails (the source's own message), else ``None``."""
    if not isinstance(entry, dict):
        return None
    try:
        source_cls(**entry)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def source_problem(data: Any, key: str = "data") -> str | None:
    """The first source entry of a parsed ``data`` section (``{"class_path", "init_args"}`` dicts) that its
    dataclass refuses, named with its key; ``None`` when all build (or the class cannot be imported here)."""
    if not isinstance(data, dict) or not isinstance(data.get("class_path"), str):
        return None
    cls = import_class(data["class_path"])
    init_args = data.get("init_args") or {}
    if cls is None or not isinstance(init_args, dict):
        return None
    for suffix, source_cls, entry in source_entries(init_args, source_arguments(cls)):
        if (problem := build_problem(source_cls, entry)) is not None:
            return f"{key}.init_args.{suffix}: {problem}"
    return None
