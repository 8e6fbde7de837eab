"""Collation of multimodal sentences into a :class:`mmlm.batch.SentenceBatch`, padded or packed.

A *row* is a list of samples that share one sequence: one sample when padded, several when packed
(attention is blocked between them by ``segment_ids``; ``position_ids`` restart for each).
Shape legend: B rows, T tokens, I images in the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmlm.batch import SentenceBatch
from mmlm.fusion import left_pad
from mmlm.sentences import IGNORE_INDEX, Sentence, Span


@dataclass
class SentenceSample:
    """One sample before collation.

    Attributes:
        sentence: the ids, LM targets and spans (items local to the sample).
        items: modality → ``[K, ...]`` tensor of this sample's K items (``"image"``: ``[K, 3, H, W]``).
        key: sample key.
        prompt: evaluation prompt (spans local to the sample, same items), or ``None``.
        task: ``"vqa"`` / ``"caption"`` for evaluation samples, else ``""``.
        references: reference answers or captions.
        id: evaluation id.
        question_type: VQA question type.
        answer_type: VQA answer type.
    """

    sentence: Sentence
    items: dict[str, torch.Tensor] = field(default_factory=dict)
    key: str = ""
    prompt: Sentence | None = None
    task: str = ""
    references: list[str] = field(default_factory=list)
    id: Any = ""
    question_type: str = ""
    answer_type: str = ""

    def __len__(self) -> int:
        return len(self.sentence)


def pack_rows(samples: Iterable[SentenceSample], max_length: int, open_rows: int = 8
              ) -> Iterator[list[SentenceSample]]:
    """Greedy first-fit packing: each sample goes into the first open row where it fits.

    At most ``open_rows`` rows stay open; when a sample fits none and all are open, the fullest
    row is emitted. A sample longer than ``max_length`` raises (truncate it first).
    """
    rows: list[list[SentenceSample]] = []
    for sample in samples:
        if len(sample) > max_length:
            raise ValueError(f"pack_rows: sample {sample.key!r} has {len(sample)} tokens > max_length {max_length}")
        target = next((row for row in rows if _length(row) + len(sample) <= max_length), None)
        if target is None:
            if len(rows) >= open_rows:
                fullest = max(rows, key=_length)
                rows.remove(fullest)
                yield fullest
            target = []
            rows.append(target)
        target.append(sample)
    yield from rows


def _length(row: Sequence[SentenceSample]) -> int:
    return sum(len(s) for s in row)


def collate_rows(rows: Sequence[Sequence[SentenceSample]], pad_id: int, length: int | None = None
                 ) -> SentenceBatch:
    """Rows of samples → a right-padded :class:`SentenceBatch` (to ``length`` or the longest row).

    Items of every modality are concatenated over the batch in sample order and the spans'
    ``item`` indices are made global. The first label of every sample is ``-100``: in a packed row
    it would otherwise be predicted from the previous sample. Prompts (evaluation) are left-padded
    into ``prompt_ids``.
    """
    width = length or max(_length(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions, segments = torch.zeros_like(ids), torch.zeros_like(ids)
    items: dict[str, list[torch.Tensor]] = {}
    offsets: dict[str, int] = {}
    spans: list[list[Span]] = []
    prompt_rows: list[tuple[Sentence, dict[str, int]]] = []
    for r, row in enumerate(rows):
        spans.append([])
        pos = 0
        for seg, sample in enumerate(row, start=1):
            n, base = len(sample), dict(offsets)
            ids[r, pos:pos + n] = torch.tensor(sample.sentence.ids, dtype=torch.long)
            labels[r, pos:pos + n] = torch.tensor(sample.sentence.labels(), dtype=torch.long)
            labels[r, pos] = IGNORE_INDEX  # nothing of this sample precedes its first token
            positions[r, pos:pos + n] = torch.arange(n)
            segments[r, pos:pos + n] = seg
            spans[r] += [s.shifted(pos, base.get(s.modality, 0)) for s in sample.sentence.spans]
            for name, tensor in sample.items.items():
                if tensor.shape[0] == 0:
                    continue  # an item-less sample (text only) adds nothing, whatever its placeholder shape
                items.setdefault(name, []).append(tensor)
                offsets[name] = offsets.get(name, 0) + tensor.shape[0]
            if sample.prompt is not None:
                prompt_rows.append((sample.prompt, base))
            pos += n
    return _assemble(rows, ids, labels, positions, segments, spans, items, prompt_rows, pad_id)


def _assemble(rows, ids, labels, positions, segments, spans, items, prompt_rows, pad_id) -> SentenceBatch:
    samples = [s for row in rows for s in row]
    stacked = {name: torch.cat(parts) for name, parts in items.items()}
    images = stacked.pop("image", torch.empty(0, 3, 0, 0))
    batch = SentenceBatch(
        input_ids=ids, attention_mask=(segments > 0).long(), labels=labels, position_ids=positions,
        segment_ids=segments, spans=spans, images=images, modalities=stacked,
        keys=[s.key for s in samples], num_samples=len(samples))
    if prompt_rows:
        if len(prompt_rows) != len(rows) or any(len(row) != 1 for row in rows):
            raise ValueError("collate_rows: evaluation prompts need one sample per row, each with a prompt")
        _add_prompts(batch, prompt_rows, pad_id)
        batch.tasks = [s.task for s in samples]
        batch.references = [s.references for s in samples]
        batch.ids = [s.id for s in samples]
        batch.question_types = [s.question_type for s in samples]
        batch.answer_types = [s.answer_type for s in samples]
    return batch


def _add_prompts(batch: SentenceBatch, prompts: list[tuple[Sentence, dict[str, int]]], pad_id: int) -> None:
    """Left-pad the prompts into ``batch.prompt_ids`` and shift their spans by each row's padding."""
    rows = [torch.tensor(p.ids, dtype=torch.long) for p, _ in prompts]
    batch.prompt_ids, batch.prompt_mask = left_pad(rows, pad_id)
    width = batch.prompt_ids.shape[1]
    batch.prompt_spans = [[s.shifted(width - len(p), base.get(s.modality, 0)) for s in p.spans]
                          for p, base in prompts]


@dataclass(frozen=True)
class SentenceCollator:
    """Picklable ``list[SentenceSample] -> SentenceBatch``: packed into rows of ``max_tokens`` when
    ``pack``, else one sample per row padded to the longest."""

    pad_id: int
    max_tokens: int = 0
    pack: bool = False

    def __call__(self, samples: list[SentenceSample]) -> SentenceBatch:
        if self.pack:
            rows = list(pack_rows(samples, self.max_tokens, open_rows=len(samples)))
            return collate_rows(rows, self.pad_id)
        return collate_rows([[s] for s in samples], self.pad_id)
