"""``mmlm data`` tools for VLMO: ``synth-pairs`` (NLVR2-style synthetic pairs) and ``vqa-answers`` (answer vocabulary)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from datamodules.tools.general import add_synthetic_arguments


def read_vqa_answers(urls: str) -> list[list[str]]:
    """The human answers of every sample of VQA shards (brace pattern or glob), in shard order."""
    import webdataset as wds

    from datamodules.pipeline.urls import expand_urls

    return [json.loads(sample["json"]).get("answers", [])
            for sample in wds.WebDataset(expand_urls(urls), shardshuffle=False)]


def vqa_answers_main(args: argparse.Namespace) -> dict[str, Any]:
    """Write the answer vocabulary of ``args.urls`` to ``args.out`` (a JSON list, most frequent first)."""
    from datamodules.formats.outputs import prepare_output_file
    from mmlm.metrics.vqa import build_answer_vocab

    out = prepare_output_file(args.out, args.overwrite)
    answers = read_vqa_answers(args.urls)
    vocab = build_answer_vocab(answers, min_count=args.min_count, max_size=args.max_size)
    out.write_text(json.dumps(vocab, indent=0) + "\n")
    return {"questions": len(answers), "answers": len(vocab), "out": str(args.out), "first": vocab[:10]}


def synth_pairs_main(args: argparse.Namespace) -> dict[str, Any]:
    """Write the synthetic pairs data set (:func:`datamodules.synthetic.pairs.write_pairs`)."""
    from datamodules.synthetic.pairs import write_pairs

    return write_pairs(args.out, train=args.train, val=args.val, seed=args.seed, shard_size=args.shard_size,
                       overwrite=args.overwrite)


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``synth-pairs`` and ``vqa-answers`` to ``mmlm data``."""
    pairs = sub.add_parser("synth-pairs", help="render NLVR2-style pairs: two shapes images + a true/false statement")
    add_synthetic_arguments(pairs, "pairs", train=4000, val=500)
    pairs.set_defaults(run=synth_pairs_main)
    answers = sub.add_parser("vqa-answers", help="answer vocabulary (JSON list) from the answers of VQA shards")
    answers.add_argument("urls", help="VQA shards: brace pattern or glob")
    answers.add_argument("--out", required=True, help="output .json file")
    answers.add_argument("--min-count", type=int, default=1, help="drop answers given fewer times")
    answers.add_argument("--max-size", type=int, default=None, help="keep at most this many answers")
    answers.set_defaults(run=vqa_answers_main, output="file")  # --out is a file (datamodules.formats.outputs)
