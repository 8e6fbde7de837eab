"""Document understanding data (Donut): Donut folders or shards → :class:`mmlm.batch.Batch`.

A source is a Donut folder (``metadata.jsonl`` + images; read directly), a plain folder of images
(prediction: every image is a document with the bare task prompt), a folder of shards (``*.tar`` +
``special_tokens.json``) or shard urls (pattern, glob, list). Folders are served to webdataset as chunk
urls (:mod:`datamodules.formats.raw`) and yield the same raw samples as the converted shards (see
:mod:`datamodules.tools.documents`), so they give identical batches.

Shape legend: B batch, T text tokens, P prompt tokens, H/W the model's input size.

Sequence layout of one example (the task prompt is the decoder's start, no bos)::

    input_ids  = prompt_ids target_ids eos pad…       prompt = <s_task> (DocVQA: <s_docvqa><s_question>…</s_question><s_answer>)
    labels     = -100…     target_ids eos -100…        target = json_to_tokens(ground truth)
    prompt_ids = pad… prompt_ids                       (left-padded, for generation)

``references`` are the JSON strings of all ground-truth parses (several for ``gt_parses``), ``tasks`` the task
names (``"cord-v2"``, ``"docvqa"``, …), ``ids`` the image file names, ``keys`` the sample keys. Training draws one
parse at random per sample (Donut); evaluation uses the first.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.base import WebDataModule
from datamodules.formats.donut_folder import (
    IMAGE_EXTENSIONS,
    METADATA,
    SPECIAL_TOKENS_FILE,
    parse_ground_truth,
    read_metadata,
    record_parses,
)
from datamodules.formats.raw import RawSpec, chunked, folder_images, open_url, raise_if_skipped
from datamodules.image_text import json_field
from datamodules.pipeline.collate import Example, pad_id, pad_left, pad_right, sequence, token_ids
from datamodules.pipeline.document_transforms import DocumentTransform
from datamodules.pipeline.shard_pipeline import ShardPipeline
from datamodules.pipeline.skips import SkipSample
from datamodules.pipeline.streams import Opener
from datamodules.pipeline.urls import check_local_shards, expand_urls
from mmlm.batch import Batch
from mmlm.encoders.base import ImagePreprocess
from mmlm.json_tokens import json_to_tokens, special_tokens, task_sequence
from mmlm.losses import IGNORE_INDEX
from mmlm.tokenizers import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class DocumentSource:
    """One document data set.

    Attributes:
        path: a Donut folder (``metadata.jsonl`` + images), a plain folder of images (no ground truth: prediction
            with the bare task prompt), a folder of shards, or shard urls (brace pattern, glob or list).
        task: task name (``"cord-v2"`` → start token ``<s_cord-v2>``) or the start token itself.
        prompt_end: the prompt runs up to and including this tag (DocVQA: ``"<s_answer>"``).
        weight: mixing weight among training sources.
    """

    path: str | list[str]
    task: str = "cord-v2"
    prompt_end: str | None = None
    weight: float = 1.0

    @property
    def task_token(self) -> str:
        """``<s_{task}>`` (or ``task`` when it already is a tag)."""
        return self.task if self.task.startswith("<") else f"<s_{self.task}>"

    @property
    def layout(self) -> str:
        """``"donut-folder"`` (``metadata.jsonl`` inside), ``"image-folder"`` (images, no ``*.tar``) or ``"shards"``."""
        if not isinstance(self.path, str) or not Path(self.path).is_dir():
            return "shards"
        folder = Path(self.path)
        if (folder / METADATA).is_file():
            return "donut-folder"
        if not any(folder.glob("*.tar")) and folder_images(folder):
            return "image-folder"
        return "shards"

    @property
    def folder(self) -> Path | None:
        """The Donut folder, or ``None`` for shards and image folders."""
        return Path(self.path) if self.layout == "donut-folder" else None

    def raw_spec(self) -> RawSpec | None:
        """How to read a Donut or image folder directly (:mod:`datamodules.formats.raw`); ``None`` for shards."""
        layout = self.layout
        return None if layout == "shards" else RawSpec(layout, str(Path(str(self.path)).resolve()))

    @property
    def urls(self) -> str | list[str]:
        """Shard urls (a folder of shards becomes its ``*.tar`` glob)."""
        if isinstance(self.path, str) and Path(self.path).is_dir():
            return str(Path(self.path) / "*.tar")
        return self.path


def task_name(task_token: str) -> str:
    """The evaluation task of a task start token: ``"<s_cord-v2>"`` → ``"cord-v2"`` (``"docvqa"`` is scored on its
    answers, other tasks on their JSON; see :mod:`mmlm.evaluation.documents`)."""
    return task_token[3:-1] if task_token.startswith("<s_") and task_token.endswith(">") else task_token


# --------------------------------------------------------------------------- examples and batches


def document_image(sample: dict[str, Any]) -> bytes:
    """The image member of a raw sample; ``SkipSample("missing_image")`` when there is none."""
    for ext in IMAGE_EXTENSIONS:
        if sample.get(ext):
            return sample[ext]
    raise SkipSample("missing_image", f"no image member in {sorted(k for k in sample if not k.startswith('__'))}")


def sample_parses(sample: dict[str, Any], required: bool = True) -> tuple[str, list[Any]]:
    """``(file_name, parses)`` of a raw sample; ``SkipSample("bad_ground_truth")`` when unusable (without
    ``required``, a sample with no ``ground_truth`` at all has no parses instead)."""
    meta = json_field(sample)
    name = str(meta.get("file_name", sample["__key__"]))
    if not required and meta.get("ground_truth") is None:
        return name, []
    try:
        return name, parse_ground_truth(meta["ground_truth"])
    except (KeyError, TypeError, ValueError) as exn:
        raise SkipSample("bad_ground_truth", f"{type(exn).__name__}: {exn}") from exn


@dataclass(frozen=True)
class DocumentExampleBuilder:
    """Picklable ``(raw sample, source index) -> Example`` (image, prompt, target, references).

    Attributes:
        task_tokens: task start token per source.
        prompt_ends: prompt end tag per source (``None``: the prompt is the task token).
        image: the document image transform.
        sort_keys: reverse-sort dict keys in targets (Donut).
        categorical_fields: keys whose values are category tokens.
        train: draw one of several parses at random (else the first).
        need_target: skip samples without a ground truth (``False`` for prediction: such a sample gets the
            bare task prompt, and a parse without its ``prompt_end`` — a DocVQA question without answer —
            the prompt ``task + tokens(parse) + prompt_end``; the target is empty).
    """

    task_tokens: tuple[str, ...]
    prompt_ends: tuple[str | None, ...]
    image: DocumentTransform
    sort_keys: bool = True
    categorical_fields: tuple[str, ...] = ()
    train: bool = False
    need_target: bool = True

    def __call__(self, sample: dict[str, Any], source: int) -> Example:
        raise_if_skipped(sample)
        file_name, parses = sample_parses(sample, required=self.need_target)
        prompt, target = self.prompt_and_target(random.choice(parses) if self.train else parses[0] if parses else None,
                                                source)
        references = [json.dumps(p, ensure_ascii=False) for p in parses]
        return Example(image=self.image(document_image(sample)), prompt=prompt, target=target,
                       references=references, id=file_name, task=task_name(self.task_tokens[source]),
                       key=sample["__key__"])

    def prompt_and_target(self, parse: Any, source: int) -> tuple[str, str]:
        """Prompt and target of one parse (``None``: no ground truth, prediction only)."""
        task, end = self.task_tokens[source], self.prompt_ends[source]
        if parse is None:
            return task, ""
        try:
            return task_sequence(parse, task, end, self.sort_keys, self.categorical_fields)
        except ValueError as exn:
            if self.need_target:
                raise SkipSample("missing_prompt_end", str(exn)) from exn
            return task + json_to_tokens(parse, self.sort_keys, self.categorical_fields) + end, ""


def collate_documents(examples: list[Example], tokenizer: Any, max_text_tokens: int) -> Batch:
    """Collate document examples into a :class:`Batch` (layout in the module docstring).

    Returns:
        ``pixels [B, 3, H, W]``, ``input_ids/attention_mask/labels [B, T]``, ``prompt_ids/prompt_mask [B, P]``.
    """
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token id; document targets end with eos")
    prompts = token_ids(tokenizer, [e.prompt for e in examples])
    targets = token_ids(tokenizer, [e.target for e in examples])
    seqs = [sequence(p, t, eos, max_text_tokens) for p, t in zip(prompts, targets)]
    prompt_rows = [p[:max_text_tokens] for p in prompts]
    return Batch(
        pixels=torch.stack([e.image for e in examples]),
        input_ids=pad_right([s[0] for s in seqs], pad),
        attention_mask=pad_right([[1] * len(s[0]) for s in seqs], 0),
        labels=pad_right([s[1] for s in seqs], IGNORE_INDEX),
        prompt_ids=pad_left(prompt_rows, pad),
        prompt_mask=pad_left([[1] * len(r) for r in prompt_rows], 0),
        keys=[e.key for e in examples], tasks=[e.task for e in examples],
        references=[list(e.references) for e in examples], ids=[e.id for e in examples],
        question_types=["" for _ in examples],
    )


@dataclass(frozen=True)
class DocumentCollator:
    """Picklable ``list[Example] -> Batch`` (wraps :func:`collate_documents`)."""

    tokenizer: Any
    max_text_tokens: int

    def __call__(self, examples: list[Example]) -> Batch:
        return collate_documents(examples, self.tokenizer, self.max_text_tokens)


# --------------------------------------------------------------------------- special tokens


def folder_tokens(folder: Path, categorical_fields: Sequence[str]) -> set[str]:
    """Special tokens the ground truths of a Donut folder need."""
    parses = [p for record in read_metadata(folder) for p in record_parses(record)]
    return set(special_tokens(parses, categorical_fields))


def shard_tokens(urls: str | list[str]) -> set[str]:
    """Tokens listed in the ``special_tokens.json`` beside the shards (warns where one is missing).

    Raises:
        FileNotFoundError: a local shard does not exist (named), so ``setup`` fails before training.
    """
    found: set[str] = set()
    shards = expand_urls(urls)
    check_local_shards(shards)
    for directory in sorted({Path(u).parent for u in shards if "://" not in u}):
        path = directory / SPECIAL_TOKENS_FILE
        if path.is_file():
            found.update(json.loads(path.read_text(encoding="utf-8"))["tokens"])
        else:
            log.warning("no %s beside the shards in %s: pass special_tokens=[…] for their JSON keys", SPECIAL_TOKENS_FILE, directory)
    return found


def source_tokens(source: DocumentSource, categorical_fields: Sequence[str]) -> set[str]:
    """The task token plus the special tokens of one source's ground truths (none for an image folder)."""
    layout = source.layout
    try:
        if layout == "donut-folder":
            tokens = folder_tokens(Path(str(source.path)), categorical_fields)
        else:
            tokens = set() if layout == "image-folder" else shard_tokens(source.urls)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"DocumentSource path {source.path!r} is neither a Donut folder (with {METADATA}), "
                                f"an image folder nor readable shards: {err}") from err
    return tokens | {source.task_token} | ({source.prompt_end} if source.prompt_end else set())


# --------------------------------------------------------------------------- data module


def path_sources(path: str | None, task: str, prompt_end: str | None) -> list[DocumentSource] | None:
    """``[DocumentSource(path, task, prompt_end)]``, or ``None`` without a path."""
    return None if path is None else [DocumentSource(path, task=task, prompt_end=prompt_end)]


class DocumentDataModule(WebDataModule):
    """Donut folders and/or document shards for Donut-style models (reading, extraction, classification, VQA).

    Tokenizer and image preprocessing come from the arguments or, when ``None``, from the trainer's
    LightningModule (``tokenizer``, ``image_preprocess``) in :meth:`setup`. :meth:`setup` also gathers
    the special tokens every source needs (task tokens, ``<s_key>``/``</s_key>``, ``<sep/>``, category
    tokens, ``special_tokens``) and gives them, sorted, to ``module.add_tokens`` when the module has
    it (else to a tokenizer given by name).

    Args:
        train: training sources, mixed by weight.
        val: validation sources (one loader each).
        test: test sources.
        predict: prediction sources.
        train_path: shorthand for ``train=[DocumentSource(train_path, task, prompt_end)]``.
        val_path: shorthand for ``val``.
        test_path: shorthand for ``test``.
        predict_path: shorthand for ``predict`` (samples need no ground truth there).
        task: task of the ``*_path`` sources (``"synthdog"``, ``"cord-v2"``, ``"rvlcdip"``, ``"docvqa"``…).
        prompt_end: prompt end tag of the ``*_path`` sources (``"<s_answer>"`` for DocVQA).
        tokenizer: hub id or directory (``None``: the module's).
        image_size: ``(H, W)`` with ImageNet mean/std (``None``: the module's ``image_preprocess``).
        batch_size: examples per batch and rank.
        num_workers: DataLoader workers per rank.
        epoch_samples: training samples per epoch over all ranks (``None``: one pass).
        shuffle_buffer: training shuffle buffer in samples.
        resampled: draw training shards (chunks) with replacement.
        seed: base seed of shard order, shuffling and mixing.
        max_text_tokens: cap on prompt + target + eos tokens.
        sort_keys: reverse-sort JSON keys in targets (Donut's order).
        categorical_fields: keys whose leaf values become one category token each (e.g. ``["class"]``).
        special_tokens: extra special tokens to add.
        align_long_axis: rotate images whose orientation differs from ``image_size``'s; ``None`` takes the
            model's ``align_long_axis`` (a converted Donut checkpoint's processor setting), else ``False``.
        random_padding: random placement inside the padding when training (centred otherwise).
        folder_chunk: entries (metadata lines, images) per chunk url of a Donut or image folder.
    """

    def __init__(
        self,
        train: list[DocumentSource] | None = None,
        val: list[DocumentSource] | None = None,
        test: list[DocumentSource] | None = None,
        predict: list[DocumentSource] | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        task: str = "cord-v2",
        prompt_end: str | None = None,
        tokenizer: str | None = None,
        image_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 256,
        resampled: bool = False,
        seed: int = 0,
        max_text_tokens: int = 128,
        sort_keys: bool = True,
        categorical_fields: list[str] | None = None,
        special_tokens: list[str] | None = None,
        align_long_axis: bool | None = None,
        random_padding: bool = True,
        folder_chunk: int = 16,
    ) -> None:
        super().__init__(train=(train or []) + (path_sources(train_path, task, prompt_end) or []) or None,
                         val=(val or []) + (path_sources(val_path, task, prompt_end) or []) or None,
                         test=(test or []) + (path_sources(test_path, task, prompt_end) or []) or None,
                         predict=(predict or []) + (path_sources(predict_path, task, prompt_end) or []) or None,
                         batch_size=batch_size, num_workers=num_workers, epoch_samples=epoch_samples,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed)
        self.tokenizer_name, self.image_size = tokenizer, image_size
        self.max_text_tokens, self.sort_keys = max_text_tokens, sort_keys
        self.categorical_fields = tuple(categorical_fields or ())
        self.extra_tokens = list(special_tokens or [])
        self.align_long_axis, self.random_padding, self.folder_chunk = align_long_axis, random_padding, folder_chunk
        self.tokenizer: Any = None
        self.preprocess: ImagePreprocess | None = None
        self.added_tokens: list[str] = []

    # -- setup ----------------------------------------------------------------------------------
    def needed_tokens(self) -> list[str]:
        """Sorted special tokens of every source of every stage, plus ``special_tokens``."""
        tokens = set(self.extra_tokens)
        for source in (s for sources in self.sources.values() for s in sources):
            tokens |= source_tokens(source, self.categorical_fields)
        return sorted(tokens)

    def setup(self, stage: str | None = None) -> None:
        """Resolve tokenizer and preprocessing (arguments first, else the module's); add the special tokens."""
        spec = self.model_spec()
        if not self.added_tokens:
            self.added_tokens = self.needed_tokens()
            if spec.add_tokens is not None:
                spec.add_tokens(self.added_tokens)
        if self.tokenizer is None:
            self.tokenizer = (load_tokenizer(self.tokenizer_name, self.added_tokens) if self.tokenizer_name is not None
                              else self.from_model("tokenizer", "tokenizer"))
        if self.preprocess is None:
            self.preprocess = (ImagePreprocess(tuple(self.image_size)) if self.image_size is not None
                               else self.from_model("image_preprocess", "image_size"))
        if self.align_long_axis is None:
            self.align_long_axis = bool(spec.align_long_axis)

    # -- pipeline hooks -------------------------------------------------------------------------
    def opener(self) -> Opener:
        """Shards and raw chunks (``mmlm-raw://``) alike: :func:`datamodules.formats.raw.open_url`."""
        return open_url

    def example_fn(self, stage: str, sources: Sequence[DocumentSource]) -> DocumentExampleBuilder:
        if self.preprocess is None:
            self.setup(stage)
        pre, train = self.preprocess, stage == "fit"
        image = DocumentTransform(size=tuple(pre.size), mean=tuple(pre.mean), std=tuple(pre.std),
                                  align_long_axis=self.align_long_axis,
                                  random_padding=train and self.random_padding, train=train,
                                  interpolation=pre.interpolation)
        return DocumentExampleBuilder(task_tokens=tuple(s.task_token for s in sources),
                                      prompt_ends=tuple(s.prompt_end for s in sources), image=image,
                                      sort_keys=self.sort_keys, categorical_fields=self.categorical_fields, train=train,
                                      need_target=stage != "predict")

    def collate_fn(self, stage: str) -> DocumentCollator:
        if self.tokenizer is None:
            self.setup(stage)
        return DocumentCollator(self.tokenizer, self.max_text_tokens)

    def build_pipeline(self, stage: str, sources: Sequence[DocumentSource], *,
                       rank: int | None = None, world_size: int | None = None) -> ShardPipeline:
        """The shard pipeline of ``sources``; a Donut or image folder is read through chunk urls
        (:mod:`datamodules.formats.raw`), enough for every rank and worker (at most ``folder_chunk`` entries each)."""
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world()
        needed = world_size * max(1, self.num_workers)
        resolved = [s if (spec := s.raw_spec()) is None else chunked(s, spec, needed, self.folder_chunk)
                    for s in sources]
        return super().build_pipeline(stage, resolved, rank=rank, world_size=world_size)
