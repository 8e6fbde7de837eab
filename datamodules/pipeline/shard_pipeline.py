"""The shard pipeline: one stage's stream of batches for one rank (:class:`ShardPipeline`, a webdataset-fed
``IterableDataset``).

Data flow inside one DataLoader worker (all stages are plain generators)::

    shard urls ─► rank split ─► worker split ─► tar reader ─► weighted mix of sources      (datamodules.pipeline.streams)
      ─► shuffle buffer (raw bytes) ─► to_example (decode; bad samples skipped + counted)
      ─► batches of examples ─► collate ─► CountedBatch(batch, skipped-since-last-batch)  (datamodules.pipeline.skips)

The items reach the trainer through :class:`datamodules.pipeline.loader.SkipCountingLoader`, which unwraps them. Every sample
is decoded inside a :func:`datamodules.pipeline.skips.collecting_notes` block of its own, so the conversions a decoder notes
are counted only for samples that became examples. Urls are expanded and checked by :mod:`datamodules.pipeline.urls`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from datamodules.pipeline.skips import (
    MAX_CONSECUTIVE_SKIPS,
    CountedBatch,
    SkipCounter,
    SkipSample,
    collecting_notes,
    log_skip,
)
from datamodules.pipeline.streams import (
    Opener,
    Sample,
    WorkerStream,
    batched,
    batches_per_rank,
    batches_per_worker,
    open_shard,
    split,
)
from datamodules.pipeline.urls import check_local_shards, describe_urls, expand_urls, source_labels

#: ``(raw sample, index of its source) -> example``; raises :class:`~datamodules.pipeline.skips.SkipSample` to drop it.
ExampleFn = Callable[[Sample, int], Any]
#: ``list[example] -> batch``.
CollateFn = Callable[[list[Any]], Any]


class ShardPipeline(IterableDataset):
    """One stage's stream of :class:`CountedBatch` items for one rank; workers split it further.

    Training (``train=True``): with ``resampled`` every worker draws shards with replacement
    forever; otherwise each pass reshuffles the shard list with ``(seed, epoch, pass)`` (same
    order on every rank), gives rank ``r`` every ``world_size``-th shard and worker ``w`` every
    ``num_workers``-th of those. With ``epoch_samples`` the passes repeat and every rank yields
    exactly :func:`batches_per_rank` full batches (so DDP ranks stay in step); without it one
    pass is made. Evaluation (``train=False``): one pass, no shuffling, partial last batch kept,
    every sample read by exactly one rank and worker.

    Args:
        sources: shard urls (pattern or list) per source.
        weights: mixing weight per source (training with several sources).
        to_example: ``(sample, source_index) -> example``; raises :class:`SkipSample` to drop one.
        collate: ``list[example] -> batch``.
        batch_size: examples per batch.
        train: training semantics (see above) instead of evaluation.
        resampled: draw shards with replacement (training only; needs ``epoch_samples``).
        shuffle_buffer: samples held (as raw bytes) by the shuffle buffer; 0 disables it.
        seed: base seed of shard order, shuffle buffer and mixing.
        epoch_samples: samples per epoch over all ranks (training), or ``None`` for one pass.
        rank: this process's global rank.
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (used to check there are enough shards).
    """

    def __init__(
        self,
        sources: Sequence[str | list[str]],
        weights: Sequence[float],
        to_example: ExampleFn,
        collate: CollateFn,
        *,
        batch_size: int,
        train: bool,
        resampled: bool,
        shuffle_buffer: int,
        seed: int,
        epoch_samples: int | None,
        rank: int,
        world_size: int,
        num_workers: int,
        opener: Opener = open_shard,
    ) -> None:
        super().__init__()
        self.patterns = list(sources)
        self.urls = [expand_urls(s) for s in sources]
        #: Key prefix per source when several are mixed (``"vqa-*"`` → keys ``"vqa-*/000000007"``).
        self.labels = source_labels(self.patterns)
        self.weights = list(weights)
        self.to_example, self.collate = to_example, collate
        self.batch_size, self.train, self.resampled = batch_size, train, resampled and train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.seed, self.epoch_samples = seed, epoch_samples if train else None
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.opener = opener
        self.epoch = 0
        #: Set by :class:`SkipCountingLoader` just before ``iter()`` to resume mid-epoch:
        #: ``{"offset": logical id of physical worker 0, "workers": [position or None per worker]}``.
        self.resume: dict[str, Any] | None = None
        self._check(sources)

    def _check(self, sources: Sequence[str | list[str]]) -> None:
        """Fail early, naming the source, on missing shards or too few shards for ranks × workers."""
        if self.resampled and self.epoch_samples is None:
            raise ValueError("resampled=True needs epoch_samples (a resampled stream never ends by itself)")
        if self.train and self.world_size > 1 and self.epoch_samples is None:
            raise ValueError(
                f"training on {self.world_size} ranks needs epoch_samples so every rank yields the same "
                "number of batches (uneven ranks hang DDP)"
            )
        workers = max(1, self.num_workers) if self.train else 1  # evaluation caps its workers instead
        needed = self.world_size * workers
        for pattern, urls in zip(sources, self.urls):
            if not urls:
                raise ValueError(f"source {pattern!r} expands to no shards")
            check_local_shards(urls)
            if not self.resampled and len(urls) < needed:
                raise ValueError(
                    f"source {pattern!r} has {len(urls)} shard(s) but {self.world_size} rank(s) × "
                    f"{workers} worker(s) need at least {needed}: write it as ≥ {needed} "
                    "shards, lower num_workers, or use resampled=True for training"
                )

    def describe(self) -> str:
        """The sources for messages: ``'data/x-*.tar' (3 shards), 'captions.jsonl' (2 chunks)``."""
        parts = []
        for pattern, urls in zip(self.patterns, self.urls):
            unit = "chunk" if urls and urls[0].startswith("mmlm-raw://") else "shard"
            parts.append(f"{describe_urls(pattern)!r} ({len(urls)} {unit}{'s' * (len(urls) != 1)})")
        return ", ".join(parts)

    def empty_epoch_message(self, skipped: dict[str, int]) -> str:
        """Why a training epoch ended without a batch, naming the sources and this epoch's skip counts."""
        counts = ", ".join(f"{reason} {n}" for reason, n in skipped.items()) or "none"
        return (f"training epoch {self.epoch} on rank {self.rank} yielded no batch of {self.batch_size} usable "
                f"samples from {self.describe()}; skipped or counted this epoch: {counts}. The run stops here "
                "instead of starting empty epochs forever: check the shards (mmlm data inspect URLS), the source "
                "kinds and batch_size")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shard order, buffer and mixing seeds depend on it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch; ``TypeError`` (length unknown) without ``epoch_samples``."""
        if self.epoch_samples is None:
            raise TypeError("length unknown: ShardPipeline without epoch_samples makes one pass")
        return batches_per_rank(self.epoch_samples, self.batch_size, self.world_size)

    def __iter__(self) -> Iterator[CountedBatch]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self.resume or {}
        worker = (physical + resume.get("offset", 0)) % num_workers
        positions = resume.get("workers") or [None] * num_workers
        return self.iter_worker(worker, num_workers, positions[worker])

    def iter_worker(self, worker: int, num_workers: int,
                    position: dict[str, Any] | None = None) -> Iterator[CountedBatch]:
        """The items worker ``worker`` of ``num_workers`` yields (callable directly to simulate workers),
        continuing after ``position`` (a :meth:`WorkerStream.state`) when given."""
        counter = SkipCounter()
        stream = WorkerStream(self, worker, num_workers, counter)
        done = 0
        if position is not None:
            stream.restore(position)
            done = position["batches"]
        chunks = batched(self._examples(stream, counter), self.batch_size, partial=not self.train)
        if self.epoch_samples is not None:
            chunks = itertools.islice(chunks, max(0, batches_per_worker(len(self), worker, num_workers) - done))
        for n, chunk in enumerate(chunks, done + 1):
            yield CountedBatch(self.collate(chunk), counter.take(), worker, stream.state(n))
        if counter.skipped:
            yield CountedBatch(None, counter.take())

    def _pass_shards(self, index: int, worker: int, num_workers: int, rep: int) -> list[str]:
        """The shards one pass of this rank and worker reads: drawn with replacement, or this rank's
        and worker's slice of the shard list (reshuffled per pass when training)."""
        urls = self.urls[index]
        if self.resampled:
            rng = random.Random(f"resample-{self.seed}-{self.epoch}-{self.rank}-{worker}-{index}-{rep}")
            return [rng.choice(urls) for _ in urls]
        order = list(urls)
        if self.train:
            random.Random(f"shards-{self.seed}-{self.epoch}-{rep}-{index}").shuffle(order)
        return split(split(order, self.rank, self.world_size), worker, num_workers)

    def _examples(self, samples: Iterable[Sample], counter: SkipCounter) -> Iterator[Any]:
        """Apply ``to_example``; count and log skipped samples, raise after too many in a row.

        Each sample is decoded in its own :func:`~datamodules.pipeline.skips.collecting_notes` block: its notes
        (``converted_*``) are added to ``counter`` when it becomes an example and dropped when it is skipped.
        """
        in_a_row = 0
        for sample in samples:
            notes = SkipCounter()
            try:
                with collecting_notes(notes):
                    example = self.to_example(sample, sample["__source__"])
            except SkipSample as exn:
                reason, detail = exn.reason, exn.detail
            except Exception as exn:  # noqa: BLE001 - a bad sample must not end a run; counted by type
                reason, detail = f"error:{type(exn).__name__}", repr(exn)
            else:
                counter.update(notes.skipped)
                in_a_row = 0
                yield example
                continue
            log_skip(counter, reason, detail, sample)
            in_a_row += 1
            if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(f"{in_a_row} samples in a row were skipped (counts {counter.skipped}); "
                                   f"last: key {sample.get('__key__')!r} in {sample.get('__url__')!r}: {reason}")
