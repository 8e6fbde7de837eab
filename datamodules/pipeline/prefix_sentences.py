"""Image + prompt + target examples as multimodal sentences: the input of the prefix families (Frozen, BLIP-2,
MetaLM) and of the text-only LM, in the same :class:`~mmlm.batch.SentenceBatch` as KOSMOS-1 and PaLM-E.

A collated :class:`~mmlm.batch.Batch` (``datamodules.pipeline.collate``) becomes a sentence batch whose every row starts with
one image span of ``M`` placeholders (``M`` = the model's connector output length; 0: text-only sentences)::

    input_ids  = <image>×M [bos]? prompt target eos pad…        spans:        [Span("image", b, 0, M)]
    prompt_ids = pad… <image>×M [bos]? prompt                   prompt_spans: [Span("image", b, P - len, M)]

so the models only embed and fill (:func:`mmlm.sentences.embed_sentence`). At evaluation, ``shots`` demonstrations
from the same batch go before each query (:func:`mmlm.fewshot.with_demonstrations`), built here once for every family.
Shape legend: B batch, T text tokens, P prompt tokens, M image placeholders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from datamodules.pipeline.collate import pad_id
from datamodules.pipeline.packing import pack_rows
from mmlm.batch import Batch, SentenceBatch
from mmlm.fewshot import with_demonstrations
from mmlm.fusion import prepend_placeholders
from mmlm.sentences import IGNORE_INDEX, Marker, Span, placeholder_ids


def image_marker(markers: tuple[Marker, ...]) -> Marker | None:
    """The ``"image"`` marker among a model's sentence markers, or ``None``."""
    return next((m for m in markers if m.modality == "image"), None)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position of each real token within its row (0 on padding), for left or right padding."""
    return (mask.long().cumsum(1) - 1).clamp(min=0) * mask.long()


def as_sentences(batch: Batch, image_tokens: int, placeholder_id: int | None) -> SentenceBatch:
    """``batch`` (``pixels [B, 3, H, W]`` or cached ``features``) → a :class:`SentenceBatch` whose rows start with
    ``image_tokens`` placeholders (``placeholder_id``) that image ``b`` of the batch fills (the layout in the module
    docstring); ``image_tokens = 0`` gives text-only sentences with no span."""
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    prompt_ids, prompt_mask = batch.prompt_ids, batch.prompt_mask
    if image_tokens:
        if placeholder_id is None:
            raise ValueError("as_sentences: image_tokens > 0 needs the placeholder id of the image marker")
        ids, mask, labels = prepend_placeholders(ids, mask, placeholder_id, image_tokens, labels)
        prompt_ids, prompt_mask, _ = prepend_placeholders(prompt_ids, prompt_mask, placeholder_id, image_tokens)
    width, lengths = prompt_ids.shape[1], prompt_mask.sum(1).tolist()
    rows = range(len(batch))
    spans = [[Span("image", b, 0, image_tokens)] if image_tokens else [] for b in rows]
    prompt_spans = [[Span("image", b, width - int(lengths[b]), image_tokens)] if image_tokens else [] for b in rows]
    return SentenceBatch(
        input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions(mask), segment_ids=mask.long(),
        spans=spans, images=batch.pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask, prompt_spans=prompt_spans,
        features=batch.features, instruction_ids=batch.instruction_ids, instruction_mask=batch.instruction_mask,
        keys=batch.keys, tasks=batch.tasks, references=batch.references, ids=batch.ids,
        question_types=batch.question_types, answer_types=batch.answer_types, num_samples=len(batch))


@dataclass(frozen=True)
class _Entry:
    """One sentence of a padded batch for :func:`pack_rows`: its row and its real length."""

    row: int
    length: int
    key: str

    def __len__(self) -> int:
        return self.length


def pack_sentences(batch: SentenceBatch, max_tokens: int, pad_id: int) -> SentenceBatch:
    """A padded training batch of :func:`as_sentences` (one right-padded sentence per row) → the same sentences
    packed first-fit into rows of at most ``max_tokens`` (:func:`~datamodules.pipeline.packing.pack_rows`):
    ``segment_ids`` 1, 2, … per sentence, ``position_ids`` restarting, spans shifted to their new start (image items
    keep their index), the first label of each sentence ``-100`` (it is an image placeholder anyway). The prompts
    (evaluation only) are dropped; the per-sample lists (keys, …) are kept in sentence order.

    Raises:
        ValueError: a sentence longer than ``max_tokens``.
    """
    lengths = batch.attention_mask.sum(1).tolist()
    keys = batch.keys or [str(b) for b in range(len(batch))]
    entries = [_Entry(b, int(n), keys[b]) for b, n in enumerate(lengths)]
    rows = list(pack_rows(entries, max_tokens, open_rows=len(entries)))
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions_, segments = torch.zeros_like(ids), torch.zeros_like(ids)
    spans: list[list[Span]] = []
    for r, row in enumerate(rows):
        spans.append([])
        start = 0
        for segment, entry in enumerate(row, start=1):
            end = start + entry.length
            ids[r, start:end] = batch.input_ids[entry.row, :entry.length]
            labels[r, start:end] = batch.labels[entry.row, :entry.length]
            labels[r, start] = IGNORE_INDEX
            positions_[r, start:end] = torch.arange(entry.length)
            segments[r, start:end] = segment
            spans[r] += [span.shifted(start) for span in batch.spans[entry.row]]
            start = end
    return replace(batch, input_ids=ids, attention_mask=(segments > 0).long(), labels=labels, position_ids=positions_,
                   segment_ids=segments, spans=spans, prompt_ids=None, prompt_mask=None, prompt_spans=[], prompt_labels=None,
                   num_samples=len(entries))


@dataclass(frozen=True)
class PrefixSentences:
    """Picklable collate ``examples → SentenceBatch``: the wrapped ``collate`` (examples → :class:`Batch`), then
    :func:`as_sentences`, then ``shots`` in-batch demonstrations before each prompt (evaluation only).

    Attributes:
        collate: the :class:`Batch` collator (``datamodules.pipeline.collate.Collator`` or the cached-features one).
        image_tokens: M placeholders per image (0: text-only sentences).
        placeholder_id: the image placeholder's id (``None`` when ``image_tokens`` is 0).
        pad_id: the tokenizer's padding id (few-shot prompts are re-padded).
        shots: demonstrations per query (0: zero-shot).
        pack_tokens: training rows of at most this many tokens holding several sentences (:func:`pack_sentences`);
            0: one sentence per row.
    """

    collate: Callable[[list[Any]], Batch]
    image_tokens: int
    placeholder_id: int | None
    pad_id: int
    shots: int = 0
    pack_tokens: int = 0

    def __call__(self, examples: list[Any]) -> SentenceBatch:
        batch = as_sentences(self.collate(examples), self.image_tokens, self.placeholder_id)
        if self.pack_tokens:
            return pack_sentences(batch, self.pack_tokens, self.pad_id)
        return with_demonstrations(batch, self.shots, self.pad_id) if self.shots else batch


def to_sentences(batch: Batch, marker: Marker, tokenizer: Any) -> SentenceBatch:
    """:func:`as_sentences` with ``marker``'s count and its placeholder's id in ``tokenizer``.

    Raises:
        ValueError: the tokenizer lacks the marker's placeholder.
    """
    placeholder = placeholder_ids(tokenizer, [marker])["image"] if marker.count else None
    return as_sentences(batch, marker.count, placeholder)


def sentence_collate(collate: Callable[[list[Any]], Batch], marker: Marker | None, tokenizer: Any,
                     shots: int = 0, pack_tokens: int = 0) -> Callable[[list[Any]], Batch | SentenceBatch]:
    """``collate`` as is when the model has no image ``marker`` (its batches are :class:`Batch`), else wrapped into
    :class:`PrefixSentences` (``marker.count`` placeholders; ``shots`` demonstrations per prompt; training rows
    packed to ``pack_tokens``).

    Raises:
        ValueError: ``shots`` or ``pack_tokens`` without a marker, or a tokenizer that lacks the marker's
            placeholder.
    """
    if marker is None:
        if shots or pack_tokens:
            raise ValueError(f"{'eval_shots' if shots else 'pack_tokens'}={shots or pack_tokens} needs sentences: "
                             "give image_tokens=… or a model with an image marker")
        return collate
    placeholder = placeholder_ids(tokenizer, [marker])["image"] if marker.count else None
    return PrefixSentences(collate, marker.count, placeholder, pad_id(tokenizer), shots, pack_tokens)
