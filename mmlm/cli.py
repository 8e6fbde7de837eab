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
from typing import Any

from pytorch_lightning import Callback, LightningDataModule, Trainer
from pytorch_lightning.cli import LightningCLI

from datamodules.synthetic.shapes import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES
from mmlm.models.base import MultimodalModule
from mmlm.reliability import add_trainer_defaults, config_problem, last_checkpoint

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
  data TOOL ...       make, convert and inspect WebDataset shards (mmlm data --help lists the tools)
  quickstart          the main job: synthetic data, tiny Frozen on CPU, evaluation (mmlm quickstart --help)
"""


class MMLMCLI(LightningCLI):
    """LightningCLI that checks shard and checkpoint paths before building anything and adds the
    reliability defaults (atomic checkpoint writes, end-of-run data report; ``mmlm.reliability``)."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if problem := config_problem(config):
            self._parser(self.subcommand).error(problem)
        if (found := last_checkpoint(config)) is not None:
            print(f"mmlm: --ckpt_path last → {found}", file=sys.stderr)
            config.ckpt_path = str(found)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        add_trainer_defaults(config, callbacks)
        return super()._instantiate_trainer(config, callbacks)


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
    make = sub.add_parser("make-shards", help="convert an image folder + captions or COCO JSON to shards")
    make.add_argument("input", help="captions .jsonl/.tsv file or COCO captions .json")
    make.add_argument("--images", default=None, help="folder the image paths are relative to (default: the input file's folder)")
    make.add_argument("--out", required=True, help="output directory for {00000..N}.tar")
    make.add_argument("--format", choices=["folder-jsonl", "folder-tsv", "coco"], required=True)
    make.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    inspect = sub.add_parser("inspect", help="counts, keys and first samples of a shard set")
    inspect.add_argument("urls", help="brace pattern, glob or single .tar")
    inspect.add_argument("-n", type=int, default=3, help="samples to show")
    add_converter_parsers(sub)
    for name in DATA_TOOL_MODULES:
        importlib.import_module(name).add_data_tools(sub)
    return parser


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
                                        split=args.split)
    if args.tool == "convert-gqa":
        return converters.convert_gqa(args.questions, args.images, args.out, shard_size=args.shard_size)
    split = args.split[0] if len(args.split) == 1 else args.split
    return converters.convert_karpathy(args.karpathy_json, args.images, args.out, split=split,
                                       shard_size=args.shard_size, per_caption=args.per_caption)


def data_main(argv: Sequence[str]) -> int:
    """Run one ``mmlm data`` tool; prints its JSON summary."""
    args = data_parser().parse_args(list(argv))
    if hasattr(args, "run"):
        print(json.dumps(args.run(args), indent=1, ensure_ascii=False))
    elif args.tool == "synth-shapes":
        from datamodules.synthetic.shapes import write_shapes

        summary = write_shapes(args.out, train=args.train, val=args.val, seed=args.seed, shard_size=args.shard_size)
        print(json.dumps(summary, indent=1))
    elif args.tool == "make-shards":
        from datamodules.tools import make_shards

        summary = make_shards(args.input, args.out, fmt=args.format, shard_size=args.shard_size,
                              image_root=args.images)
        print(json.dumps(summary, indent=1))
    elif args.tool.startswith("convert-"):
        print(json.dumps(convert_main(args), indent=1, ensure_ascii=False))
    else:
        from datamodules.tools import inspect, print_inspection

        print_inspection(inspect(args.urls, n=args.n))
    return 0


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
    if argv[0] not in LIGHTNING_COMMANDS:
        print(f"mmlm: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(LIGHTNING_COMMANDS + ('data', 'quickstart'))}", file=sys.stderr)
        return 2
    lightning_cli(None if from_shell else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
