"""The ``mmlm`` command.

``mmlm fit|validate|test|predict --config FILE.yaml [--key value ...]`` is LightningCLI with the
model and datamodule chosen by ``class_path``; ``mmlm data …`` holds the data tools and
``mmlm quickstart`` runs the main job.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback, LightningDataModule, Trainer
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules.base import EmptyEpochError
from datamodules.synthetic.shapes import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES
from mmlm.checkpointing import CheckpointError, checkpoint_problem, is_local
from mmlm.language.base import GenerationConfig
from mmlm.models.base import MultimodalModule
from mmlm.reliability import (
    SPECIAL_CKPT_PATHS,
    TRAINER_ARGUMENT_DEFAULTS,
    add_trainer_defaults,
    config_problem,
    last_checkpoint,
)

#: Exit status of a preempted run (128 + SIGTERM): a scheduler must not take it for a finished job.
PREEMPTED_EXIT = 143
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Modules that add ``mmlm data`` tools. Each has ``add_data_tools(sub)``, which adds subparsers to ``sub`` and sets
# ``run=callable(args) -> dict`` with ``set_defaults``; the returned summary is printed as JSON. Keep their
# module-level imports light: the parser is built for every ``mmlm data`` call.
DATA_TOOL_MODULES: tuple[str, ...] = (
    "datamodules.interleaved_tools",
    "datamodules.pair_tools",
    "mmlm.features",
    "datamodules.document_tools",
    "datamodules.embodied_tools",
    "datamodules.text",
)
USAGE = """usage: mmlm COMMAND [options]

  fit | validate | test | predict --config FILE.yaml [--key value ...]
                      LightningCLI over every mmlm model and datamodule (mmlm fit --help)
  validate | test | predict --model DIR [--data …]
                      evaluate an exported model (mmlm export) without its training config
  export --ckpt_path X --out DIR [--config FILE.yaml] [--format auto|hf|mmlm]
                      a checkpoint as Hugging Face files (BLIP-2, Donut) or a self-contained mmlm directory
  data TOOL ...       make, convert and inspect WebDataset shards (mmlm data --help lists the tools)
  quickstart          the main job: synthetic data, tiny Frozen on CPU, evaluation (mmlm quickstart --help)
"""


#: The model settings of :class:`MultimodalModule`'s own optimiser and schedule (named when ``--optimizer`` is refused).
MODEL_OPTIMIZER_SETTINGS = ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "betas")
#: Strategies Lightning runs on GPUs only (its FSDPStrategy refuses a CPU accelerator; DeepSpeed needs CUDA).
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def optimizer_problem(config: Any) -> str | None:
    """Why LightningCLI's ``--optimizer``/``--lr_scheduler`` are refused when given, else ``None``.

    Lightning would replace the model's ``configure_optimizers`` by them, silently dropping the model's AdamW with
    decay/no-decay groups and its warmup + cosine schedule; the model's own settings are named instead.
    """
    given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
    if not given:
        return None
    settings = ", ".join(f"--model.init_args.{name}" for name in MODEL_OPTIMIZER_SETTINGS)
    return (f"{' and '.join(given)} would replace the model's own optimiser (AdamW over decay/no-decay parameter "
            f"groups) and its warmup + cosine schedule; mmlm refuses them. Set the model's settings instead: {settings}")


def strategy_label(strategy: Any) -> str:
    """A strategy as written in a parsed config: its name, or the ``class_path`` of ``class_path`` + ``init_args``."""
    return str(strategy.get("class_path") if hasattr(strategy, "get") else strategy)


def device_problem(config: Any) -> str | None:
    """Why the parsed ``trainer`` section cannot run on this machine for want of a GPU, else ``None``.

    Checked before the model is built (which may download gigabytes), for an explicit GPU accelerator or a
    GPU-only strategy on a machine without CUDA.
    """
    if torch.cuda.is_available():
        return None
    accelerator = str(config.get("trainer.accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return (f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; use --trainer.accelerator=auto "
                "(every visible GPU, else the CPU) or cpu")
    strategy = strategy_label(config.get("trainer.strategy") or "auto")
    if any(name in strategy.lower() for name in GPU_ONLY_STRATEGIES):
        return (f"trainer.strategy={strategy} runs on GPUs only and this machine has none; to run on the CPU use "
                "--trainer.strategy=ddp (or leave the strategy config out)")
    return None


def generation_problem(config: Any) -> str | None:
    """Why ``model.init_args.generation`` cannot become a :class:`GenerationConfig` (naming the field), else ``None``;
    checked before the model's parts are built."""
    settings = config.get("model.init_args.generation")
    if settings is None or not hasattr(settings, "as_dict"):
        return None
    try:
        GenerationConfig(**settings.as_dict())
    except (TypeError, ValueError) as err:
        return f"model.init_args.generation: {err}"
    return None


class MMLMCLI(LightningCLI):
    """LightningCLI that checks the config before building anything (``--optimizer``/``--lr_scheduler`` refused,
    GPU settings on a machine without one, decoding settings, missing shard and checkpoint paths), changes the
    trainer defaults of :data:`mmlm.reliability.TRAINER_ARGUMENT_DEFAULTS` and adds the reliability defaults
    (atomic checkpoint writes, end-of-run data report; ``mmlm.reliability``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Trainer defaults of mmlm (a config file or the command line still overrides them)."""
        parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_ARGUMENT_DEFAULTS.items()})

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if problem := (optimizer_problem(config) or device_problem(config) or generation_problem(config)
                       or config_problem(config)):
            self._parser(self.subcommand).error(problem)
        if "weights_only" in config:  # how Lightning loads --ckpt_path: never by unpickling arbitrary objects
            if config.weights_only is False:
                self._parser(self.subcommand).error(
                    "--weights_only=false: mmlm loads checkpoints with torch.load(weights_only=True) only (unpickling "
                    "an untrusted checkpoint runs its code); mmlm's own checkpoints hold plain data")
            config.weights_only = True
        try:
            found = last_checkpoint(config)
        except CheckpointError as err:
            self._parser(self.subcommand).error(str(err))
        if found is not None:
            print(f"mmlm: --ckpt_path last → {found}", file=sys.stderr)
            config.ckpt_path = str(found)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        add_trainer_defaults(config, callbacks)
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """The model of ``--ckpt_path``'s hyperparameters only when the user gave none.

        Lightning merges a checkpoint's hyperparameters over the parsed config, so they would silently win over the
        user's config file and command line (``--model.init_args.generation…`` for an evaluation). With a model
        config given it is the truth (the weights load strictly, so a mismatch is named); without one, the model is
        rebuilt from the checkpoint's recorded config (``mmlm validate --ckpt_path X --data …``)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is None or config.get("model") is None:
            super()._parse_ckpt_path()


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI over every ``MultimodalModule`` and datamodule.

    The resolved config is written next to the run's checkpoints and may overwrite an older one,
    so re-running into the same directory works. Missing shard or ``--ckpt_path`` files stop the
    command before any class is built; checkpoints are written atomically
    (:class:`mmlm.checkpointing.AtomicCheckpointIO`) and :class:`mmlm.reliability.DataReport`
    summarises skipped samples at the end.
    """
    return MMLMCLI(
        MultimodalModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


def data_parser() -> argparse.ArgumentParser:
    """Arguments of ``mmlm data TOOL``: the tools here plus those of :data:`DATA_TOOL_MODULES`."""
    parser = argparse.ArgumentParser(prog="mmlm data", description="Make and inspect WebDataset shards.")
    sub = parser.add_subparsers(dest="tool", required=True)
    synth = sub.add_parser("synth-shapes", help="render coloured-shape images with captions and VQA")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train", type=int, default=DEFAULT_TRAIN_IMAGES, help="training images")
    synth.add_argument("--val", type=int, default=DEFAULT_VAL_IMAGES, help="validation images")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    add_make_shards_parser(sub)
    inspect = sub.add_parser("inspect", help="counts, keys and first samples of a shard set")
    inspect.add_argument("urls", help="brace pattern, glob or single .tar")
    inspect.add_argument("-n", type=int, default=3, help="samples to show")
    add_converter_parsers(sub)
    for name in DATA_TOOL_MODULES:
        importlib.import_module(name).add_data_tools(sub)
    add_overwrite_flags(sub)
    return parser


def add_make_shards_parser(sub: argparse._SubParsersAction) -> None:
    """``make-shards``: captions files (jsonl/tsv, COCO or LAVIS JSON, LAION/img2dataset parquet) + images → shards."""
    from datamodules.tools import FORMATS
    from datamodules.transforms import MAX_IMAGE_PIXELS

    make = sub.add_parser("make-shards", help="convert captions (jsonl/tsv, COCO or LAVIS JSON, parquet) + images to "
                                              "shards")
    make.add_argument("input", help="captions .jsonl/.tsv, COCO captions or LAVIS caption-list .json, or a LAION / "
                                    "img2dataset .parquet")
    make.add_argument("--images", default=None,
                      help="folder the image paths are relative to (default: the input file's folder); for URLs, the "
                           "img2dataset download folder")
    make.add_argument("--image-map", default=None, help="url → file map for URL inputs (.json, .jsonl, .parquet, .tsv)")
    make.add_argument("--out", required=True, help="output directory for {00000..N}.tar")
    make.add_argument("--format", choices=FORMATS, default=None,
                      help="input format (default: from the file: .jsonl, .tsv, .parquet; a .json by its content)")
    make.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    make.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                      help="downsize larger images to this many pixels, keeping the aspect (the readers skip larger "
                           "ones); 0: no limit")
    make.add_argument("--val-fraction", type=float, default=0.0,
                      help="hold out this fraction of the images (by a stable hash of the file name) as OUT/val/, "
                           "the rest in OUT/train/ (default 0: no split)")


def add_overwrite_flags(sub: argparse._SubParsersAction) -> None:
    """``--overwrite`` for every tool with an ``--out``: without it a non-empty output folder (or an existing output
    file) is refused; with it only the files an earlier run listed in its ``summary.json`` are replaced
    (:mod:`datamodules.outputs`)."""
    for tool in sub.choices.values():
        if any(action.dest == "out" for action in tool._actions):
            tool.add_argument("--overwrite", action="store_true",
                              help="replace an earlier run's output in --out (only the files its summary.json lists; "
                                   "anything else there is refused); default: refuse a non-empty --out")


def add_converter_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``convert-…`` tools: public data sets' official files → shards (``datamodules.converters``)."""
    vqa = sub.add_parser("convert-vqav2", help="VQAv2 / OK-VQA questions (+ annotations) and COCO images → VQA shards")
    vqa.add_argument("--questions", required=True, help="[v2_]OpenEnded_mscoco_{split}_questions.json")
    vqa.add_argument("--annotations", default=None, help="[v2_]mscoco_{split}_annotations.json (omit for test-dev/test)")
    vqa.add_argument("--images", required=True, help="folder of the split's images, e.g. val2014/")
    vqa.add_argument("--image-pattern", default="COCO_{split}_{image_id:012d}.jpg",
                     help="image file name with {split} and {image_id} (COCO 2017: '{image_id:012d}.jpg')")
    vqa.add_argument("--split", default=None, help="{split} of the pattern (default: the questions' data_subtype)")
    gqa = sub.add_parser("convert-gqa", help="GQA questions and images → VQA shards (one reference answer)")
    gqa.add_argument("--questions", required=True, help="e.g. testdev_balanced_questions.json")
    gqa.add_argument("--images", required=True, help="folder of {imageId}.jpg")
    karpathy = sub.add_parser("convert-karpathy", help="Karpathy split file (COCO, Flickr30k) → caption shards")
    karpathy.add_argument("--karpathy-json", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    karpathy.add_argument("--images", required=True, help="folder that filepath/filename are relative to")
    karpathy.add_argument("--split", nargs="+", default=["test"],
                          help="test, val, train (= train + restval) or several names (e.g. train restval)")
    karpathy.add_argument("--per-caption", action="store_true",
                          help="one sample per caption (retrieval: 5 captions per COCO image) instead of per image")
    for tool in (vqa, gqa, karpathy):
        tool.add_argument("--out", required=True, help="output directory for {00000..N}.tar")
        tool.add_argument("--shard-size", type=int, default=1000, help="samples per shard")


def convert_main(args: argparse.Namespace) -> dict:
    """Run the ``convert-…`` tool named by ``args.tool``; returns its summary."""
    from datamodules import converters

    if args.tool == "convert-vqav2":
        return converters.convert_vqav2(args.questions, args.annotations, args.images, args.out,
                                        shard_size=args.shard_size, image_pattern=args.image_pattern,
                                        split=args.split, overwrite=args.overwrite)
    if args.tool == "convert-gqa":
        return converters.convert_gqa(args.questions, args.images, args.out, shard_size=args.shard_size,
                                      overwrite=args.overwrite)
    split = args.split[0] if len(args.split) == 1 else args.split
    return converters.convert_karpathy(args.karpathy_json, args.images, args.out, split=split,
                                       shard_size=args.shard_size, per_caption=args.per_caption,
                                       overwrite=args.overwrite)


#: Errors of a data tool that are the user's to fix (a path, an output folder; with
#: ``datamodules.outputs.InputError``, a format): one line, no traceback.
DATA_TOOL_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                 IsADirectoryError)


def run_data_tool(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the parsed ``mmlm data`` tool; returns its summary (``None`` for ``inspect``, which prints)."""
    if getattr(args, "out", None) is not None and getattr(args, "output", "folder") == "folder":
        from datamodules.outputs import check_output

        check_output(args.out, args.overwrite)  # before any work (e.g. before cache-features builds the model)
    if hasattr(args, "run"):
        return args.run(args)
    if args.tool == "synth-shapes":
        from datamodules.synthetic.shapes import write_shapes

        return write_shapes(args.out, train=args.train, val=args.val, seed=args.seed, shard_size=args.shard_size,
                            overwrite=args.overwrite)
    if args.tool == "make-shards":
        from datamodules.tools import make_shards

        return make_shards(args.input, args.out, fmt=args.format, shard_size=args.shard_size, image_root=args.images,
                           val_fraction=args.val_fraction, max_pixels=args.max_pixels or None,
                           image_map=args.image_map, overwrite=args.overwrite)
    if args.tool.startswith("convert-"):
        return convert_main(args)
    from datamodules.tools import inspect, print_inspection

    print_inspection(inspect(args.urls, n=args.n))
    return None


def data_main(argv: Sequence[str]) -> int:
    """Run one ``mmlm data`` tool; prints its JSON summary. A path, format or output-folder problem is printed as
    one ``mmlm data TOOL: error: …`` line (exit status 2), without a traceback."""
    from datamodules.outputs import InputError

    args = data_parser().parse_args(list(argv))
    try:
        summary = run_data_tool(args)
    except (*DATA_TOOL_ERRORS, InputError) as err:
        print(f"mmlm data {args.tool}: error: {err}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


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
        return data_main(argv[1:])
    if argv[0] == "quickstart":
        from mmlm.quickstart import quickstart_main

        return quickstart_main(argv[1:])
    if argv[0] == "export":
        return export_main(argv[1:])
    if argv[0] not in LIGHTNING_COMMANDS:
        print(f"mmlm: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(LIGHTNING_COMMANDS + ('export', 'data', 'quickstart'))}", file=sys.stderr)
        return 2
    expanded = expand_checkpoint_model(expand_exported_model(argv))
    try:
        lightning_cli(None if from_shell and expanded == argv else expanded)
    except EmptyEpochError as err:  # data that yields no batch: one message naming the sources, not a traceback
        print(f"mmlm {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except SIGTERMException:
        print("mmlm: stopped by SIGTERM; the step it stopped at is saved as last.ckpt (resume with --ckpt_path last)",
              file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
