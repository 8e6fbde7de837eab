"""Typed size configs of sub-parts (:class:`~mmlm.connectors.QFormerConfig`, :class:`~mmlm.encoders.MoMEConfig`):
plain dataclasses (no base class, so the CLI reads them as dicts) whose ``None`` fields keep the part's own default. The CLI checks their keys; a checkpoint's
hyperparameters hold them as plain dicts, which :func:`part_kwargs` reads back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any


def part_kwargs(config_class: type, value: Any | Mapping[str, Any] | None) -> dict[str, Any]:
    """The set fields of a size config as the part's keyword arguments. ``value`` is an instance of
    ``config_class``, the plain dict a checkpoint holds (its keys checked by building the class), or ``None``.

    Raises:
        TypeError: a dict key that ``config_class`` does not have.
    """
    if value is None:
        return {}
    config = value if isinstance(value, config_class) else config_class(**dict(value))
    return {key: item for key, item in asdict(config).items() if item is not None}
