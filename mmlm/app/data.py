"""``mmlm data TOOL``: make, convert and inspect WebDataset shards; the tools of :data:`DATA_TOOL_MODULES` register
themselves."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from datamodules.synthetic.shapes import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES

# Modules that add ``mmlm data`` tools. Each has ``add_data_tools(sub)``, which adds subparsers to ``sub`` and sets
# ``run=callable(args) -> dict`` with ``set_defaults``; the returned summary is printed as JSON. Keep their
# module-level imports light: the parser is built for every ``mmlm data`` call.
DATA_TOOL_MODULES: tuple[str, ...] = (
    "datamodules.interleaved_tools",
    "datamodules.pair_tools",
    "mmlm.app.features",
    "datamodules.document_tools",
    "datamodules.embodied_tools",
    "datamodules.text",
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
