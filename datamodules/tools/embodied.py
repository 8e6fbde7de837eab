"""``mmlm data synth-tabletop``: write the synthetic embodied (tabletop) data set for PaLM-E.

Registered in ``mmlm.app.data.DATA_TOOL_MODULES``; the generator is imported only when the tool runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from datamodules.tools.general import add_synthetic_arguments

DEFAULT_TRAIN = 8000  # sentences; scripts/palme_tiny.py uses the same sizes
DEFAULT_VAL = 400


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``synth-tabletop`` to the ``mmlm data`` subparsers."""
    tool = sub.add_parser("synth-tabletop", help="render tabletop block scenes with state, questions and plans (PaLM-E)")
    add_synthetic_arguments(tool, "sentences", train=DEFAULT_TRAIN, val=DEFAULT_VAL)
    tool.set_defaults(run=synth_tabletop)


def synth_tabletop(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator with the parsed arguments; returns its summary."""
    from datamodules.synthetic.tabletop import write_tabletop

    return write_tabletop(args.out, train=args.train, val=args.val, seed=args.seed, shard_size=args.shard_size,
                          overwrite=args.overwrite)
