"""Packages that export every public class but import each module only when one of its names is first used
(``datamodules``, ``mmlm.encoders``): ``mmlm data --help`` and the data tools do not pay for timm, open_clip and
transformers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``'s ``__init__``: ``exports`` maps each exported name to the module
    that defines it; a name is imported on first access and then kept in the package's namespace.

    Raises (from ``__getattr__``):
        AttributeError: a name that is not exported.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
