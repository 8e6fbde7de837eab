"""Command lines of the tiny CPU recipes in ``scripts/*_tiny.py``: one ``--flag`` per keyword of the recipe's run
function (defaults written once, in its signature), then the recipe's table with the wall time."""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any


class RecipeInputError(ValueError):
    """A recipe keyword's value is unusable (named, with what was expected); raised before any work, and printed by
    :func:`recipe_main` as one usage error (exit code 2) instead of a traceback."""


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``1/0`` (any case) → bool; anything else raises ``ArgumentTypeError``."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(default: Any) -> Callable[[str], Any]:
    """The argparse type of a keyword: that of its default (bool parsed by :func:`parse_bool`), else ``str``."""
    if isinstance(default, bool):
        return parse_bool
    return type(default) if isinstance(default, int | float | str) else str


def recipe_parser(run: Callable[..., Any], description: str | None) -> argparse.ArgumentParser:
    """A parser with ``--some-name`` for each keyword ``some_name`` of ``run``, defaulting to its default."""
    first_line = (description or run.__name__).strip().splitlines()[0]
    parser = argparse.ArgumentParser(description=first_line, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, param in inspect.signature(run).parameters.items():
        parser.add_argument("--" + name.replace("_", "-"), type=flag_type(param.default), default=param.default)
    return parser


def recipe_main(run: Callable[..., dict[str, Any]], report: Callable[[dict[str, Any], float], None],
                description: str | None, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` into ``run``'s keywords, run it and ``report(results, seconds)``; returns the exit code 0.

    A :class:`RecipeInputError` from ``run`` ends the program as argparse's own errors do: ``usage`` and one
    ``error:`` line on stderr, exit code 2."""
    parser = recipe_parser(run, description)
    args = parser.parse_args(None if argv is None else list(argv))
    start = time.time()
    try:
        results = run(**vars(args))
    except RecipeInputError as err:
        parser.error(str(err))
    report(results, time.time() - start)
    return 0
