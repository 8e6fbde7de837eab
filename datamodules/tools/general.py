"""The general ``mmlm data`` tools — ``synth-shapes``, ``make-shards``, ``inspect`` and the ``convert-…`` tools of
public data sets — and the argument block every synthetic-data tool shares (:func:`add_synthetic_arguments`).

Every tool module registers its tools the same way: ``add_data_tools(sub)`` adds subparsers and sets
``run=callable(args) -> dict | None`` with ``set_defaults`` (listed in ``mmlm.app.data.DATA_TOOL_MODULES``). Module
level imports stay light: the parser is built for every ``mmlm data`` call; each ``run`` imports its work.
"""

from __future__ import annotations

import argparse
from typing import Any

from datamodules.pipeline.transforms import MAX_IMAGE_PIXELS
from datamodules.synthetic.shapes import DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES


def add_synthetic_arguments(tool: argparse.ArgumentParser, unit: str, train: int | None, val: int | None,
                            shard_size: int | None = 1000, seed: int | None = 0, out_help: str = "output directory",
                            train_flag: str = "--train") -> None:
    """``--out``, ``--train`` (or ``train_flag``), ``--val``, ``--seed`` and ``--shard-size`` of a synthetic-data
    tool; ``unit`` names what is counted ("images", "pairs"); ``None`` defaults leave the choice to the generator."""
    tool.add_argument("--out", required=True, help=out_help)
    tool.add_argument(train_flag, type=int, default=train, help=f"training {unit}")
    tool.add_argument("--val", type=int, default=val, help=f"validation {unit}")
    tool.add_argument("--seed", type=int, default=seed)
    tool.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``synth-shapes``, ``make-shards``, ``inspect``, ``convert-vqav2``, ``convert-gqa`` and
    ``convert-karpathy`` to the ``mmlm data`` subparsers."""
    synth = sub.add_parser("synth-shapes", help="render coloured-shape images with captions and VQA")
    add_synthetic_arguments(synth, "images", DEFAULT_TRAIN_IMAGES, DEFAULT_VAL_IMAGES)
    synth.set_defaults(run=synth_shapes)
    add_make_shards(sub)
    inspect = sub.add_parser("inspect", help="counts, keys and first samples of a shard set")
    inspect.add_argument("urls", help="brace pattern, glob or single .tar")
    inspect.add_argument("-n", type=int, default=3, help="samples to show")
    inspect.set_defaults(run=inspect_shards)
    add_converters(sub)


def add_make_shards(sub: argparse._SubParsersAction) -> None:
    """``make-shards``: captions files (jsonl/tsv, COCO or LAVIS JSON, LAION/img2dataset parquet) + images → shards."""
    from datamodules.formats.captions import FORMATS

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
    make.set_defaults(run=make_shards)


def add_converters(sub: argparse._SubParsersAction) -> None:
    """The ``convert-…`` tools: public data sets' official files → shards (:mod:`datamodules.formats.converters`)."""
    vqa = sub.add_parser("convert-vqav2", help="VQAv2 / OK-VQA questions (+ annotations) and COCO images → VQA shards")
    vqa.add_argument("--questions", required=True, help="[v2_]OpenEnded_mscoco_{split}_questions.json")
    vqa.add_argument("--annotations", default=None, help="[v2_]mscoco_{split}_annotations.json (omit for test-dev/test)")
    vqa.add_argument("--images", required=True, help="folder of the split's images, e.g. val2014/")
    vqa.add_argument("--image-pattern", default="COCO_{split}_{image_id:012d}.jpg",
                     help="image file name with {split} and {image_id} (COCO 2017: '{image_id:012d}.jpg')")
    vqa.add_argument("--split", default=None, help="{split} of the pattern (default: the questions' data_subtype)")
    vqa.set_defaults(run=convert_vqav2)
    gqa = sub.add_parser("convert-gqa", help="GQA questions and images → VQA shards (one reference answer)")
    gqa.add_argument("--questions", required=True, help="e.g. testdev_balanced_questions.json")
    gqa.add_argument("--images", required=True, help="folder of {imageId}.jpg")
    gqa.set_defaults(run=convert_gqa)
    karpathy = sub.add_parser("convert-karpathy", help="Karpathy split file (COCO, Flickr30k) → caption shards")
    karpathy.add_argument("--karpathy-json", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    karpathy.add_argument("--images", required=True, help="folder that filepath/filename are relative to")
    karpathy.add_argument("--split", nargs="+", default=["test"],
                          help="test, val, train (= train + restval) or several names (e.g. train restval)")
    karpathy.add_argument("--per-caption", action="store_true",
                          help="one sample per caption (retrieval: 5 captions per COCO image) instead of per image")
    karpathy.set_defaults(run=convert_karpathy)
    for tool in (vqa, gqa, karpathy):
        tool.add_argument("--out", required=True, help="output directory for {00000..N}.tar")
        tool.add_argument("--shard-size", type=int, default=1000, help="samples per shard")


def synth_shapes(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data synth-shapes``: :func:`~datamodules.synthetic.shapes.write_shapes`."""
    from datamodules.synthetic.shapes import write_shapes

    return write_shapes(args.out, train=args.train, val=args.val, seed=args.seed, shard_size=args.shard_size,
                        overwrite=args.overwrite)


def make_shards(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data make-shards``: :func:`~datamodules.tools.make_shards.make_shards`."""
    from datamodules.tools.make_shards import make_shards as write

    return write(args.input, args.out, fmt=args.format, shard_size=args.shard_size, image_root=args.images,
                 val_fraction=args.val_fraction, max_pixels=args.max_pixels or None, image_map=args.image_map,
                 overwrite=args.overwrite)


def inspect_shards(args: argparse.Namespace) -> None:
    """``mmlm data inspect``: prints counts, keys and the first samples (no summary to return)."""
    from datamodules.tools.make_shards import inspect, print_inspection

    print_inspection(inspect(args.urls, n=args.n))


def convert_vqav2(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-vqav2``: :func:`~datamodules.formats.converters.convert_vqav2`."""
    from datamodules.formats.converters import convert_vqav2 as convert

    return convert(args.questions, args.annotations, args.images, args.out, shard_size=args.shard_size,
                   image_pattern=args.image_pattern, split=args.split, overwrite=args.overwrite)


def convert_gqa(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-gqa``: :func:`~datamodules.formats.converters.convert_gqa`."""
    from datamodules.formats.converters import convert_gqa as convert

    return convert(args.questions, args.images, args.out, shard_size=args.shard_size, overwrite=args.overwrite)


def convert_karpathy(args: argparse.Namespace) -> dict[str, Any]:
    """``mmlm data convert-karpathy``: :func:`~datamodules.formats.converters.convert_karpathy`."""
    from datamodules.formats.converters import convert_karpathy as convert

    split = args.split[0] if len(args.split) == 1 else args.split
    return convert(args.karpathy_json, args.images, args.out, split=split, shard_size=args.shard_size,
                   per_caption=args.per_caption, overwrite=args.overwrite)
