"""Text-only corpora for language-model pretraining (MetaLM's semi-causal objective on text documents).

A document is the ``txt`` member of a webdataset sample. Plain text files become such shards with
:func:`write_text_shards` (documents separated by blank lines). Each document becomes one example with an
empty prompt, the text as target and task ``"text"``; :class:`~mmlm.batch.Batch` ``pixels`` are ``[B, 0]``
(no images). A document longer than ``max_text_tokens`` continues in the next rows of the batch
(:func:`document_rows`): nothing is cut, every token is a target exactly once. Raw text is tokenised with
special tokens split (a literal ``</s>`` stays text, :func:`mmlm.sentences.text_ids`).

Shape legend: B batch, T text tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.base import WebDataModule
from datamodules.formats.outputs import prepare_output, write_summary
from datamodules.formats.shards import ShardWriter
from datamodules.image_text import Source, text_field, url_sources
from datamodules.pipeline.collate import Example, pad_id, pad_left, pad_right
from datamodules.pipeline.prefix_sentences import image_marker, sentence_collate
from datamodules.pipeline.skips import SkipSample
from mmlm.batch import Batch
from mmlm.losses import IGNORE_INDEX
from mmlm.sentences import prefix_image_marker, text_ids
from mmlm.tokenizers import load_tokenizer


def documents(path: str | Path) -> Iterator[str]:
    """The blank-line-separated documents of a UTF-8 text file, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8")
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if block.strip():
            yield " ".join(block.split())


def write_text_shards(paths: Iterable[str | Path], out_dir: str | Path, shard_size: int = 1000,
                      overwrite: bool = False) -> int:
    """Write the documents of plain text files as ``{out_dir}/text-{i:05d}.tar`` shards (``txt`` members) and
    ``{out_dir}/summary.json``; ``out_dir`` must be empty unless ``overwrite`` (:mod:`datamodules.formats.outputs`).

    Returns the number of documents written.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"text-shards input {str(path)!r} is not a file: expected UTF-8 text files")
    out = prepare_output(out_dir, overwrite)
    writer = ShardWriter(out, shard_size=shard_size, prefix="text-")
    for path in paths:
        for doc in documents(path):
            writer.write({"__key__": f"{writer.count:09d}", "txt": doc.encode("utf-8")})
    writer.close()
    write_summary(out, {"inputs": [str(p) for p in paths], "documents": writer.count, "shards": writer.shards,
                        "urls": writer.url()})
    return writer.count


def add_data_tools(sub: argparse._SubParsersAction) -> None:
    """Add ``text-shards`` to the ``mmlm data`` subparsers (registered in ``mmlm.app.data.DATA_TOOL_MODULES``)."""
    tool = sub.add_parser("text-shards", help="plain text files (blank-line-separated documents) → txt shards")
    tool.add_argument("files", nargs="+", help="UTF-8 text files")
    tool.add_argument("--out", required=True, help="output directory for text-{00000..N}.tar")
    tool.add_argument("--shard-size", type=int, default=1000, help="documents per shard")
    tool.set_defaults(run=lambda args: {"documents": write_text_shards(args.files, args.out, args.shard_size,
                                                                       args.overwrite), "out": str(args.out)})


@dataclass(frozen=True)
class TextExampleBuilder:
    """Picklable ``(sample, source_index) -> Example`` of a text document (``SkipSample("missing_text")``)."""

    field: str = "txt"

    def __call__(self, sample: dict[str, Any], source: int) -> Example:
        text = text_field(sample, self.field)
        if not text:
            raise SkipSample("missing_text", f"no {self.field!r} member or an empty one")
        key = sample["__key__"]
        return Example(image=torch.zeros(0), prompt="", target=text, references=[text], id=key, task="text", key=key)


def document_rows(ids: Sequence[int], bos: int | None, eos: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """``(row ids, row labels)`` of one document ``ids`` in rows of at most ``max_tokens``, nothing dropped.

    Each row is ``[bos]`` + the next tokens of ``ids + [eos]`` (the kosmos-2/torchscale LM loaders start every
    block with bos); labels are the ids, bos ``-100``. Without a bos id a continuation row starts with the
    previous row's last token as context (label ``-100``), so each token is still predicted once. The labels
    of the rows, concatenated, are ``ids + [eos]`` (after the first token when there is no bos).
    """
    if max_tokens < 2:
        raise ValueError(f"document_rows: max_tokens={max_tokens} leaves no room for text after the row's lead")
    body, rows, start = list(ids) + [eos], [], 0
    while start < len(body):
        if bos is not None:
            context, stop = [bos], min(len(body), start + max_tokens - 1)
        else:
            context, stop = body[max(0, start - 1):start], min(len(body), start + max_tokens - (start > 0))
            if start == 0:  # the first token has no context: it is the row's lead, never a target
                context, start, stop = body[:1], 1, min(len(body), max_tokens)
        rows.append((context + body[start:stop], [IGNORE_INDEX] * len(context) + body[start:stop]))
        start = stop
    return rows


@dataclass(frozen=True)
class TextCollator:
    """Picklable ``list[Example] -> Batch`` of text documents: each document in as many rows of at most
    ``max_tokens`` as it needs (:func:`document_rows`), so a batch of B documents has B or more rows."""

    tokenizer: Any
    max_tokens: int

    def __call__(self, examples: list[Example]) -> Batch:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"{type(tok).__name__} has no eos token id; text rows need one to end documents")
        rows, owners = [], []
        for example in examples:
            for row in document_rows(text_ids(tok, example.target), tok.bos_token_id, tok.eos_token_id,
                                     self.max_tokens):
                rows.append(row)
                owners.append(example)
        ids, pad = [r[0] for r in rows], pad_id(tok)
        prompts = [[tok.bos_token_id] if tok.bos_token_id is not None else [] for _ in rows]
        return Batch(
            pixels=torch.zeros(len(rows), 0), input_ids=pad_right(ids, pad),
            attention_mask=pad_right([[1] * len(r) for r in ids], 0), labels=pad_right([r[1] for r in rows], IGNORE_INDEX),
            prompt_ids=pad_left(prompts, pad), prompt_mask=pad_left([[1] * len(p) for p in prompts], 0),
            keys=[e.key for e in owners], tasks=[e.task for e in owners],
            references=[list(e.references) for e in owners], ids=[e.id for e in owners])


class TextDataModule(WebDataModule):
    """Text documents from webdataset shards (``txt`` members; e.g. caption shards, whose images are ignored).

    Args:
        train_urls: training shards (brace pattern, glob, list), or ``None``.
        val_urls: validation shards, or ``None``.
        tokenizer: hub id or directory; ``None`` takes the trainer's module ``tokenizer`` in :meth:`setup`.
        batch_size: documents per batch and rank (a document longer than ``max_text_tokens`` adds rows).
        num_workers: DataLoader workers per rank.
        epoch_samples: training documents per epoch over all ranks (``None``: one pass, one rank).
        shuffle_buffer: training shuffle buffer in documents.
        resampled: draw training shards with replacement (needs ``epoch_samples``).
        seed: base seed for shard order and shuffling.
        max_text_tokens: tokens per row (bos + text, + eos in a document's last row); longer documents
            continue in the next rows.
        text_field: the sample member holding the text.
    """

    def __init__(self, train_urls: str | list[str] | None = None, val_urls: str | list[str] | None = None,
                 tokenizer: str | None = None, batch_size: int = 32, num_workers: int = 0,
                 epoch_samples: int | None = None, shuffle_buffer: int = 1000, resampled: bool = False, seed: int = 0,
                 max_text_tokens: int = 128, text_field: str = "txt") -> None:
        super().__init__(train=url_sources(train_urls, "caption"), val=url_sources(val_urls, "caption"), test=None,
                         predict=None, batch_size=batch_size, num_workers=num_workers, epoch_samples=epoch_samples,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        self.tokenizer_name, self.max_text_tokens, self.text_field = tokenizer, max_text_tokens, text_field
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer: the argument, else the trainer's LightningModule's ``tokenizer``."""
        if self.tokenizer is not None:
            return
        self.tokenizer = (load_tokenizer(self.tokenizer_name) if self.tokenizer_name is not None
                          else self.from_model("tokenizer", "tokenizer"))

    def example_fn(self, stage: str, sources: Sequence[Source]) -> TextExampleBuilder:
        return TextExampleBuilder(self.text_field)

    def collate_fn(self, stage: str) -> Any:
        """Documents → :class:`~mmlm.batch.Batch`; for a model with an image marker (MetaLM, the text-only LM),
        text-only sentences (no image span) in a :class:`~mmlm.batch.SentenceBatch`."""
        if self.tokenizer is None:
            self.setup(stage)
        marker = prefix_image_marker(0) if image_marker(self.model_spec().markers) else None
        return sentence_collate(TextCollator(self.tokenizer, self.max_text_tokens), marker, self.tokenizer)
