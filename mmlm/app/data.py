"""``mmlm data TOOL``: make, convert and inspect WebDataset shards; the tools of :data:`DATA_TOOL_MODULES` register
themselves."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

# Modules that add ``mmlm data`` tools. Each has ``add_data_tools(sub)``, which adds subparsers to ``sub`` and sets
# ``run=callable(args) -> dict`` with ``set_defaults``; the returned summary is printed as JSON. Keep their
# module-level imports light: the parser is built for every ``mmlm data`` call.
DATA_TOOL_MODULES: tuple[str, ...] = (
    "datamodules.tools.general",
    "datamodules.tools.interleaved",
    "datamodules.tools.pairs",
    "mmlm.app.features",
    "datamodules.tools.documents",
    "datamodules.tools.embodied",
    "datamodules.text_corpora",
)


def data_parser() -> argparse.ArgumentParser:
    """Arguments of ``mmlm data TOOL``: the tools of every module in :data:`DATA_TOOL_MODULES`."""
    parser = argparse.ArgumentParser(prog="mmlm data", description="Make and inspect WebDataset shards.")
    sub = parser.add_subparsers(dest="tool", required=True)
    for name in DATA_TOOL_MODULES:
        importlib.import_module(name).add_data_tools(sub)
    add_overwrite_flags(sub)
    return parser


def add_overwrite_flags(sub: argparse._SubParsersAction) -> None:
    """``--overwrite`` for every tool with an ``--out``: without it a non-empty output folder (or an existing output
    file) is refused; with it only the files an earlier run listed in its ``summary.json`` are replaced
    (:mod:`datamodules.formats.outputs`)."""
    for tool in sub.choices.values():
        if any(action.dest == "out" for action in tool._actions):
            tool.add_argument("--overwrite", action="store_true",
                              help="replace an earlier run's output in --out (only the files its summary.json lists; "
                                   "anything else there is refused); default: refuse a non-empty --out")


#: Errors of a data tool that are the user's to fix (a path, an output folder; with
#: ``datamodules.formats.outputs.InputError``, a format): one line, no traceback.
DATA_TOOL_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                 IsADirectoryError)


def run_data_tool(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the parsed ``mmlm data`` tool; returns its summary (``None`` for ``inspect``, which prints)."""
    if getattr(args, "out", None) is not None and getattr(args, "output", "folder") == "folder":
        from datamodules.formats.outputs import check_output

        check_output(args.out, args.overwrite)  # before any work (e.g. before cache-features builds the model)
    return args.run(args)


def data_main(argv: Sequence[str]) -> int:
    """Run one ``mmlm data`` tool; prints its JSON summary. A path, format or output-folder problem is printed as
    one ``mmlm data TOOL: error: …`` line (exit status 2), without a traceback."""
    from datamodules.formats.outputs import InputError

    args = data_parser().parse_args(list(argv))
    try:
        summary = run_data_tool(args)
    except (*DATA_TOOL_ERRORS, InputError) as err:
        print(f"mmlm data {args.tool}: error: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0
