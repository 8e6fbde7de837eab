"""The ``mmlm`` command.

``mmlm fit|validate|test|predict --config FILE.yaml [--key value ...]`` is LightningCLI with the model and datamodule
chosen by ``class_path`` (:mod:`mmlm.app.lightning`); ``mmlm data …`` holds the data tools (:mod:`mmlm.app.data`),
``mmlm export`` writes a checkpoint out, ``mmlm report`` writes a run's HTML page (:mod:`mmlm.app.report`) and
``mmlm quickstart`` runs the main job. Each command imports what it needs
when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: Exit status of a preempted run (128 + SIGTERM): a scheduler must not take it for a finished job.
PREEMPTED_EXIT = 143
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: mmlm COMMAND [options]

  fit | validate | test | predict --config FILE.yaml [--key value ...]
                      LightningCLI over every mmlm model and datamodule (mmlm fit --help)
  validate | test | predict --model DIR [--data …]
                      evaluate an exported model (mmlm export) without its training config
  export --ckpt_path X --out DIR [--config FILE.yaml] [--format auto|hf|mmlm]
                      a checkpoint as Hugging Face files (BLIP-2, Donut) or a self-contained mmlm directory
  data TOOL ...       make, convert and inspect WebDataset shards (mmlm data --help lists the tools)
  quickstart          the main job: synthetic data, tiny Frozen on CPU, evaluation (mmlm quickstart --help)
  report RUN_DIR [--out FILE]
                      one self-contained HTML page of a run: metrics, curves, examples (also after validate/test)
  memory --config FILE.yaml [--gpu-memory 24GB] [--batch-size N] [--seq-len T] [--json]
                      predicted GPU memory of a training step, and the knobs that make it fit (mmlm.app.memory)
"""


def export_main(argv: Sequence[str]) -> int:
    """``mmlm export``: write a checkpoint's module as Hugging Face files or a self-contained mmlm directory."""
    parser = argparse.ArgumentParser(prog="mmlm export", description="Export a checkpoint (mmlm.models.exported).")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of mmlm fit")
    parser.add_argument("--out", required=True, help="output directory (must not hold an export already)")
    parser.add_argument("--config", default=None,
                        help="the model's config, for a checkpoint that does not record it (built in Python)")
    parser.add_argument("--format", default="auto", choices=["auto", "hf", "mmlm"],
                        help="hf: transformers' format (BLIP-2, Donut); mmlm: model.yaml + safetensors; auto: hf "
                             "where the family has it")
    args = parser.parse_args(list(argv))
    from mmlm.models.exported import export

    try:
        summary = export(args.ckpt_path, args.out, args.config, args.format)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        parser.error(str(err))
    print(json.dumps(summary, indent=1))
    return 0


def expand_exported_model(argv: list[str]) -> list[str]:
    """``--model DIR`` of an export → the model's ``class_path``/``init_args`` (and, for the mmlm format, a callback
    that loads its weights); other arguments unchanged."""
    from mmlm.models.exported import INFO_FILE, MODEL_FILE, model_config

    for i, arg in enumerate(argv):
        value, span = (argv[i + 1], 2) if arg == "--model" and i + 1 < len(argv) else (
            (arg.split("=", 1)[1], 1) if arg.startswith("--model=") else (None, 0))
        if value is None or not Path(value).is_dir():
            continue
        directory = Path(value).resolve()
        if (directory / MODEL_FILE).is_file():
            loader = {"class_path": "mmlm.models.exported.LoadExportedWeights", "init_args": {"directory": str(directory)}}
            replacement = ["--model", json.dumps(model_config(directory)), f"--trainer.callbacks+={json.dumps(loader)}"]
        elif (directory / INFO_FILE).is_file():  # a Hugging Face export: the family's importer reads it
            family = json.loads((directory / INFO_FILE).read_text())["family"]
            replacement = ["--model", json.dumps({"class_path": f"{family}.from_hf",
                                                  "init_args": {"name_or_path": str(directory)}})]
        else:
            continue
        return argv[:i] + replacement + argv[i + span:]
    return argv


def option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (the last one given), else ``None``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"{name}="):
            value = arg.split("=", 1)[1]
    return value


def expand_checkpoint_model(argv: list[str]) -> list[str]:
    """``validate/test/predict/fit --ckpt_path FILE`` without ``--model`` or ``--config``: the model section the
    checkpoint records, as ``--model {class_path, init_args}`` (LightningCLI needs a model before it reads the
    checkpoint). A checkpoint file that cannot be read stops here with one message naming it.

    Raises:
        SystemExit: status 2, with the message on stderr.
    """
    from mmlm.app.reliability import SPECIAL_CKPT_PATHS
    from mmlm.checkpointing import checkpoint_problem, is_local
    from mmlm.models.exported import checkpoint_model_config

    ckpt = option_value(argv, "--ckpt_path")
    given = any(arg in ("--model", "--config", "-c") or arg.startswith(("--model=", "--config=", "--model."))
                for arg in argv)
    if ckpt is None or given or ckpt in SPECIAL_CKPT_PATHS or not is_local(ckpt):
        return argv
    if problem := checkpoint_problem(ckpt):
        print(f"mmlm {argv[0]}: error: ckpt_path={ckpt!r}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        config = checkpoint_model_config(ckpt)
    except ValueError as err:
        print(f"mmlm {argv[0]}: error: ckpt_path={ckpt!r}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return [argv[0], "--model", json.dumps(config), *argv[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmlm`` console script."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "data":
        from mmlm.app.data import data_main

        return data_main(argv[1:])
    if argv[0] == "quickstart":
        from mmlm.app.quickstart import quickstart_main

        return quickstart_main(argv[1:])
    if argv[0] == "export":
        return export_main(argv[1:])
    if argv[0] == "report":
        from mmlm.app.report import report_main

        return report_main(argv[1:])
    if argv[0] == "memory":
        from mmlm.app.memory import memory_main

        return memory_main(argv[1:])
    if argv[0] not in LIGHTNING_COMMANDS:
        print(f"mmlm: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(LIGHTNING_COMMANDS + ('export', 'data', 'quickstart', 'report', 'memory'))}", file=sys.stderr)
        return 2
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from datamodules.pipeline.loader import EmptyEpochError
    from mmlm.app.lightning import lightning_cli

    expanded = expand_checkpoint_model(expand_exported_model(argv))
    try:
        cli = lightning_cli(None if from_shell and expanded == argv else expanded)
    except EmptyEpochError as err:  # data that yields no batch: one message naming the sources, not a traceback
        print(f"mmlm {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except SIGTERMException:
        print("mmlm: stopped by SIGTERM; the step it stopped at is saved as last.ckpt (resume with --ckpt_path last)",
              file=sys.stderr)
        return PREEMPTED_EXIT
    if argv[0] in ("validate", "test"):  # mmlm.app.report: the page of what was just evaluated
        from mmlm.app.report import report_after_run

        report_after_run(cli.trainer, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
