"""Generic webdataset shard pipeline: sources, mixing, rank/worker split, epoch length, skip counts.

Data flow inside one DataLoader worker (all stages are plain generators)::

    shard urls ─► rank split ─► worker split ─► tar reader ─► weighted mix of sources
      ─► shuffle buffer (raw bytes) ─► to_example (decode; bad samples skipped + counted)
      ─► batches of examples ─► collate ─► CountedBatch(batch, skipped-since-last-batch)

Skip counts cross the process boundary *with the batches*: every worker yields
:class:`CountedBatch` items, and :class:`SkipCountingLoader` (a ``DataLoader`` subclass running
in the main process) adds each item's counts to the module's :class:`SkipCounter` and hands only
``item.batch`` on. Counts of samples skipped after a worker's last batch travel in one final
item whose ``batch`` is ``None``; the loader swallows it.

Exact resume: each batch also carries its worker's *position* after it (:class:`WorkerStream`:
per source the pass, shard index and sample offset; the mixing and shuffle-buffer RNG states;
raw samples drawn). The loader keeps the position of the last batch the trainer consumed per
worker and returns it from ``state_dict()`` (Lightning stores it in the checkpoint as the fit
loop's ``combined_loader`` state); ``load_state_dict()`` makes the next ``iter()`` of the same
epoch continue after the last consumed batch. See ``docs/reliability.md``.

Never hang: a training epoch that yields no batch (an empty tar, only bad samples, fewer usable samples than a
batch) raises :class:`EmptyEpochError` naming the sources and the epoch's skip counts, instead of letting the trainer
start empty epochs forever; a local folder given as a shard url is refused (:func:`folder_problem`). When sources are
mixed, each sample's key is prefixed by its source's label (:func:`source_labels`), so equal keys of different sets
stay apart in logs and batches. See ``docs/data-formats.md``.
"""

from __future__ import annotations

import glob
import itertools
import logging
import random
import re
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

#: A worker that skips this many samples in a row raises instead of spinning forever.
MAX_CONSECUTIVE_SKIPS = 1000
#: Reason under which tar read errors (truncated archive, duplicate member, unreadable shard) are counted.
TAR_ERROR = "tar_error"
#: Counted events with this prefix are conversions (the sample was used), not skips.
CONVERTED = "converted_"
#: Batches the loader remembers beyond the trainer's consumed count (Lightning prefetches at most one).
PENDING_BATCHES = 16

Sample = dict[str, Any]
ExampleFn = Callable[[Sample, int], Any]
CollateFn = Callable[[list[Any]], Any]


class ShardSource(Protocol):
    """What the base pipeline needs from a source: shard urls and a mixing weight."""

    urls: str | list[str]
    weight: float


class SkipSample(Exception):
    """Raised by an example function to drop one sample; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipCounter:
    """Counts of skipped samples by reason (``{"bad_image": 3, "missing_caption": 1}``)."""

    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` more samples skipped for ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def update(self, counts: dict[str, int]) -> None:
        """Add a dict of counts (e.g. the delta carried by a :class:`CountedBatch`)."""
        for reason, n in counts.items():
            self.add(reason, n)

    def take(self) -> dict[str, int]:
        """Return the counts and reset them (a worker's delta since its last batch)."""
        counts, self.skipped = self.skipped, {}
        return counts

    def total(self) -> int:
        """Number of skipped samples over all reasons (conversions, ``converted_*``, excluded)."""
        return sum(n for reason, n in self.skipped.items() if not reason.startswith(CONVERTED))


#: Conversions noted while the current sample is decoded (one per process; drained after every sample).
_NOTES = SkipCounter()


def note(event: str) -> None:
    """Count a non-fatal event of the sample being decoded, e.g. ``note("converted_cmyk")``.

    Called by decoders (``datamodules.transforms``); the pipeline adds the notes of a sample that
    became an example to its counts and drops those of a skipped sample.
    """
    _NOTES.add(event)


@dataclass
class CountedBatch:
    """What a worker yields: a collated batch (or ``None`` for a counts-only tail) and skip deltas."""

    batch: Any | None
    skipped: dict[str, int]
    worker: int | None = None
    position: dict[str, Any] | None = None

    def pin_memory(self) -> CountedBatch:
        """Pin the wrapped batch (``DataLoader(pin_memory=True)`` calls this)."""
        if self.batch is not None and hasattr(self.batch, "pin_memory"):
            self.batch = self.batch.pin_memory()
        return self


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand shard patterns into a list of shards.

    A pattern is a brace pattern (``"data/{00000..00009}.tar"``; ``::`` joins patterns) or a
    local glob (``"data/train/vqa-*.tar"``, sorted); a list holds several patterns.

    Raises:
        FileNotFoundError: a glob matches no file.
        FolderAsShardError: a pattern is a local folder (:func:`folder_problem` names the patterns of its shards).
    """
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    return [u for pattern in patterns for u in _expand_one(pattern)]


def _expand_one(pattern: str) -> list[str]:
    """One brace pattern or local glob → shard list; a local folder is refused (:func:`folder_problem`)."""
    if "://" not in pattern and not pattern.startswith("pipe:") and Path(pattern).is_dir():
        raise FolderAsShardError(folder_problem(Path(pattern)))
    if "://" in pattern or pattern.startswith("pipe:") or not any(c in pattern for c in "*?["):
        return wds.shardlists.expand_urls(pattern)
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    return matches


class FolderAsShardError(IsADirectoryError, ValueError):
    """A folder given where shard urls were expected (an ``OSError`` for the CLI tools, a ``ValueError`` for configs)."""


def shard_families(folder: Path) -> dict[str, int]:
    """The ``*.tar`` files directly in ``folder`` grouped by name without digits: ``{"vqa-*.tar": 2, "*.tar": 3}``."""
    families: dict[str, int] = {}
    for path in sorted(folder.glob("*.tar")):
        family = re.sub(r"\d+", "*", path.stem) + ".tar"
        families[family] = families.get(family, 0) + 1
    return families


def folder_problem(folder: Path) -> str:
    """Why a folder cannot be a shard url, with the patterns that would name its shards.

    A folder is never expanded implicitly: it may hold shards of several kinds (``captions-*.tar`` beside
    ``vqa-*.tar``) or stale ones, and reading a folder as a tar used to yield nothing, forever.
    """
    families = shard_families(folder)
    if families:
        shown = ", ".join(f"{str(folder / name)!r} ({n} shard{'s' * (n > 1)})" for name, n in families.items())
        return f"{str(folder)!r} is a folder, not a shard: name its shards with a pattern, e.g. {shown}"
    below = sorted({p.parent.relative_to(folder).as_posix() for p in folder.glob("*/*.tar")})
    hint = f"; its subfolders {', '.join(f'{b}/' for b in below[:5])} hold shards" if below else ""
    return f"{str(folder)!r} is a folder without *.tar shards{hint}: name the shards with a pattern"


def check_local_shards(urls: list[str]) -> None:
    """Raise ``FileNotFoundError`` naming local shards (no ``scheme://`` or ``pipe:``) that do not exist."""
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist: {shown}")


def describe_urls(urls: str | Sequence[str]) -> str:
    """A short name of a source's urls for messages: the pattern, or the first url (a raw chunk's file) and a count."""
    if isinstance(urls, str):
        return url_name(urls)
    items = [str(u) for u in urls]
    if not items:
        return "[]"
    names = list(dict.fromkeys(url_name(u) for u in items))
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(items) - 1} more)"


def url_name(url: str) -> str:
    """The file a url reads: its path, or the ``path`` of a raw chunk (``mmlm-raw://fmt?path=…``)."""
    if "://" in url:
        parts = urllib.parse.urlparse(url)
        path = urllib.parse.parse_qs(parts.query).get("path")
        if path:
            return path[0]
    return url


def source_labels(sources: Sequence[str | Sequence[str]]) -> list[str]:
    """Short, distinct labels of mixed sources (the pattern's file name without ``.tar``: ``vqa-*``,
    ``dataset_coco.json``); the parent folder is added where names coincide, then the index."""
    names = [Path(describe_urls(s).split(" (+")[0]) for s in sources]
    labels = [n.name.removesuffix(".tar") for n in names]
    if len(set(labels)) < len(labels):
        labels = [f"{n.parent.name}/{label}" for n, label in zip(names, labels)]
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i}" for i, label in enumerate(labels)]
    return labels


def split(items: list[str], index: int, count: int) -> list[str]:
    """Every ``count``-th item starting at ``index`` (the rank or worker slice)."""
    return items[index::count]


def batches_per_rank(epoch_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank yields per epoch: ``epoch_samples // (world_size * batch_size)``, ≥ 1."""
    return max(1, epoch_samples // (world_size * batch_size))


def batches_per_worker(per_rank: int, worker: int, num_workers: int) -> int:
    """This worker's share of ``per_rank`` batches (the first ``per_rank % num_workers`` get one more)."""
    return per_rank // num_workers + int(worker < per_rank % num_workers)


def weighted_mix(streams: list[Iterator[Sample]], weights: Sequence[float], rng: random.Random) -> Iterator[Sample]:
    """Draw each next sample from a stream picked with probability ∝ weight; stop when one runs dry."""
    indices = list(range(len(streams)))
    while True:
        (i,) = rng.choices(indices, weights=weights)
        sample = next(streams[i], None)
        if sample is None:
            return
        yield sample


def shuffled(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Shuffle through a buffer of ``size`` samples: once it is full every new sample replaces a
    random one, which is yielded; the rest is shuffled at the end. ``rng``'s draws depend only on
    how many samples passed, so replaying the same stream reproduces buffer and order."""
    buffer: list[Sample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def rng_state(rng: random.Random | None) -> list[Any] | None:
    """``rng.getstate()`` as nested lists of ints (checkpoint friendly), ``None`` without an rng."""
    if rng is None:
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random | None, state: list[Any] | None) -> None:
    """Inverse of :func:`rng_state`."""
    if rng is not None and state is not None:
        rng.setstate((state[0], tuple(state[1]), state[2]))


def batched(items: Iterable[Any], size: int, partial: bool) -> Iterator[list[Any]]:
    """Group ``items`` into lists of ``size``; the last shorter list is kept only when ``partial``."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        if len(chunk) == size or partial:
            yield chunk


class SourceStream:
    """Raw samples of one source for one rank and worker, and its read position.

    The position ``[pass, shard, offset]`` says that the last sample yielded was the ``offset``-th
    of shard ``shard`` in this worker's shard list of pass ``pass`` (lists are derived from the seed,
    epoch and pass by :meth:`ShardPipeline._pass_shards`). :meth:`seek` before iterating makes the
    stream continue after such a position; tar errors met while seeking are not counted again.
    """

    def __init__(self, pipeline: ShardPipeline, index: int, worker: int, num_workers: int,
                 counter: SkipCounter) -> None:
        self.pipeline, self.index, self.worker, self.num_workers = pipeline, index, worker, num_workers
        self.counter = counter
        self.label = pipeline.labels[index] if len(pipeline.labels) > 1 else ""
        self.pass_, self.shard, self.offset = 0, 0, 0
        self.muted = self.shard_failed = False

    def position(self) -> list[int]:
        """``[pass, shard, offset]`` of the last sample yielded (``[0, 0, 0]`` before the first)."""
        return [self.pass_, self.shard, self.offset]

    def seek(self, position: Sequence[int]) -> None:
        """Continue after ``position`` (call before iterating)."""
        self.pass_, self.shard, self.offset = (int(v) for v in position)

    def _on_error(self, exn: Exception) -> bool:
        """Webdataset handler: count the first tar read error of a shard (unless muted), log it, continue.

        A truncated or corrupt shard usually raises more than once (member, then header): it counts once.
        """
        if self.muted or self.shard_failed:
            log.debug("further tar read error: %r", exn)
            return True
        self.shard_failed = True
        self.counter.add(TAR_ERROR)
        log.warning("tar read error (counted as %s; the rest of the shard is lost): %r", TAR_ERROR, exn)
        return True

    def __iter__(self) -> Iterator[Sample]:
        start_pass, start_shard, skip = self.position()
        for pass_ in itertools.count(start_pass):
            shards = self.pipeline._pass_shards(self.index, self.worker, self.num_workers, pass_)
            first = start_shard if pass_ == start_pass else 0
            read = 0
            for shard in range(first, len(shards)):
                to_skip = skip if (pass_, shard) == (start_pass, start_shard) else 0
                self.muted, self.shard_failed = to_skip > 0, False
                for n, sample in enumerate(wds.tarfile_samples([{"url": shards[shard]}], handler=self._on_error), 1):
                    read += 1
                    self.muted = n < to_skip
                    if n <= to_skip:
                        continue
                    self.pass_, self.shard, self.offset = pass_, shard, n
                    sample["__source__"] = self.index
                    if self.label:  # mixed sources: keys may collide, the source tells them apart
                        sample["__key__"] = f"{self.label}/{sample.get('__key__')}"
                    yield sample
                self.muted = False
            if self.pipeline.epoch_samples is None:
                return
            if read == 0:
                raise RuntimeError(f"shards {shards[:3]}… of source {self.index} yielded no samples "
                                   f"(counts {self.counter.skipped})")


class WorkerStream:
    """The raw samples one worker reads in one epoch (sources → mix → shuffle buffer) and its position.

    The position (:meth:`state`) is ``{"batches", "drawn", "sources": [[pass, shard, offset]…],
    "mix_rng", "shuffle_rng"}``: batches yielded, raw samples drawn from the (shuffled) stream,
    each source's read position and the RNG states. :meth:`restore` continues after a position:
    without a shuffle buffer by seeking every source (cost: re-reading the current shard); with
    one by replaying the epoch's raw stream — tar reads, no decoding — until ``drawn`` samples
    came out, because the buffer's contents are samples read earlier; the replayed position must
    equal the saved one, else the data changed and resuming raises.
    """

    def __init__(self, pipeline: ShardPipeline, worker: int, num_workers: int, counter: SkipCounter) -> None:
        tag = f"{pipeline.seed}-{pipeline.epoch}-{pipeline.rank}-{worker}"
        self.sources = [SourceStream(pipeline, i, worker, num_workers, counter) for i in range(len(pipeline.urls))]
        self.weights = pipeline.weights
        self.mix_rng = random.Random(f"mix-{tag}") if len(self.sources) > 1 else None
        self.buffer = pipeline.shuffle_buffer
        self.shuffle_rng = random.Random(f"shuffle-{tag}") if self.buffer > 0 else None
        self.drawn = 0
        self._samples = self._build()

    def _build(self) -> Iterator[Sample]:
        if self.mix_rng is None:
            samples: Iterator[Sample] = iter(self.sources[0])
        else:
            samples = weighted_mix([iter(s) for s in self.sources], self.weights, self.mix_rng)
        if self.shuffle_rng is not None:
            samples = shuffled(samples, self.buffer, self.shuffle_rng)
        for sample in samples:
            self.drawn += 1
            yield sample

    def __iter__(self) -> Iterator[Sample]:
        return self._samples

    def state(self, batches: int) -> dict[str, Any]:
        """This worker's position after ``batches`` batches (see the class docstring)."""
        return {"batches": batches, "drawn": self.drawn, "sources": [s.position() for s in self.sources],
                "mix_rng": rng_state(self.mix_rng), "shuffle_rng": rng_state(self.shuffle_rng)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after the position ``state`` (call before iterating)."""
        if self.shuffle_rng is None:
            for source, position in zip(self.sources, state["sources"]):
                source.seek(position)
            set_rng_state(self.mix_rng, state["mix_rng"])
            self.drawn = state["drawn"]
            return
        for source in self.sources:
            source.muted = True  # these tar errors were counted before the checkpoint
        for _ in itertools.islice(self._samples, state["drawn"]):
            pass
        replayed = self.state(state["batches"])
        if replayed != state:
            raise RuntimeError(
                "cannot resume the data position: replaying the shards did not reach the saved position "
                f"(saved sources {state['sources']}, drawn {state['drawn']}; replayed {replayed['sources']}, "
                f"drawn {replayed['drawn']}); were shards, seed, batch_size or shuffle_buffer changed?")


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
        """Apply ``to_example``; count and log skipped samples, raise after too many in a row."""
        in_a_row = 0
        for sample in samples:
            _NOTES.take()
            try:
                example = self.to_example(sample, sample["__source__"])
            except SkipSample as exn:
                reason, detail = exn.reason, exn.detail
            except Exception as exn:  # noqa: BLE001 - a bad sample must not end a run; counted by type
                reason, detail = f"error:{type(exn).__name__}", repr(exn)
            else:
                counter.update(_NOTES.take())
                in_a_row = 0
                yield example
                continue
            _NOTES.take()
            log_skip(counter, reason, detail, sample)
            in_a_row += 1
            if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(f"{in_a_row} samples in a row were skipped (counts {counter.skipped}); "
                                   f"last: key {sample.get('__key__')!r} in {sample.get('__url__')!r}: {reason}")


def log_skip(counter: SkipCounter, reason: str, detail: str, sample: Sample) -> None:
    """Count one skipped sample; the first of each reason is logged at WARNING, later ones at DEBUG."""
    level = logging.WARNING if reason not in counter.skipped else logging.DEBUG
    counter.add(reason)
    log.log(level, "skipped sample %r in %r: %s %s", sample.get("__key__"), sample.get("__url__"), reason, detail)


def counting_handler(counter: SkipCounter) -> Callable[[Exception], bool]:
    """A webdataset error handler that counts tar errors under :data:`TAR_ERROR`, logs them and continues."""

    def handler(exn: Exception) -> bool:
        counter.add(TAR_ERROR)
        log.warning("tar read error (counted as %s): %r", TAR_ERROR, exn)
        return True

    return handler


class EmptyEpochError(RuntimeError):
    """A training epoch yielded no batch: the run stops instead of starting empty epochs forever."""


def counts_since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """Per-reason counts added between two snapshots of a counter (zero deltas left out)."""
    delta = {reason: n - before.get(reason, 0) for reason, n in now.items()}
    return {reason: n for reason, n in sorted(delta.items()) if n}


class SkipCountingLoader(DataLoader):
    """``DataLoader`` over a :class:`ShardPipeline`: unwraps :class:`CountedBatch`, tallies skips and
    keeps the data position for exact resume (``state_dict``/``load_state_dict``, which Lightning
    calls when it saves and restores a checkpoint).

    Args:
        dataset: the pipeline (its items are already batches, so ``batch_size=None`` is passed on).
        counter: main-process counter that receives every item's skip counts.
        epoch_fn: called at each ``iter()`` for the epoch to reshuffle with (``None``: keep the
            pipeline's own ``epoch``).
        consumed_fn: batches of the current epoch the trainer has consumed (``None``: every batch
            handed out counts as consumed). Needed because Lightning may fetch a batch ahead.
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``…).
    """

    def __init__(self, dataset: ShardPipeline, counter: SkipCounter,
                 epoch_fn: Callable[[], int] | None = None, consumed_fn: Callable[[], int] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", None)
        super().__init__(dataset, **kwargs)
        self.counter = counter
        self.epoch_fn, self.consumed_fn = epoch_fn, consumed_fn
        self._pending_state: dict[str, Any] | None = None
        self._begin(dataset.epoch, None)

    @property
    def workers(self) -> int:
        """Worker streams per rank (``num_workers``, or 1 in the main process)."""
        return max(1, self.num_workers)

    def _begin(self, epoch: int, resume: dict[str, Any] | None) -> None:
        """Reset the position bookkeeping for an iteration of ``epoch`` (continuing ``resume``)."""
        self._epoch = epoch
        self._handed_out = resume["batches"] if resume else 0
        self._settled = list(resume["workers"]) if resume else [None] * self.workers
        self._last_worker = resume["last_worker"] if resume else -1
        self._recent: deque[tuple[int, int, dict[str, Any], dict[str, int]]] = deque()

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        resume = self._take_resume(self.dataset.epoch)
        self._begin(self.dataset.epoch, resume)
        if resume is not None:
            self.dataset.resume = {"offset": (resume["last_worker"] + 1) % self.workers, "workers": resume["workers"]}
        try:
            iterator = super().__iter__()  # workers (or the in-process iterator) take the resume point now
        finally:
            self.dataset.resume = None
        before = dict(self.counter.skipped)
        for item in iterator:
            self.counter.update(item.skipped)
            if item.batch is not None:
                self._record(item)
                yield item.batch
        if self.dataset.train and self._handed_out == 0:
            raise EmptyEpochError(self.dataset.empty_epoch_message(counts_since(before, self.counter.skipped)))

    def _record(self, item: CountedBatch) -> None:
        """Remember which worker made the batch just handed out, and its position after it."""
        self._recent.append((self._handed_out, item.worker, item.position, item.skipped))
        self._handed_out += 1
        while len(self._recent) > PENDING_BATCHES:
            _, worker, position, _ = self._recent.popleft()
            self._settled[worker], self._last_worker = position, worker

    def _take_resume(self, epoch: int) -> dict[str, Any] | None:
        """The loaded state if it belongs to ``epoch`` (and is not a finished epoch), else ``None``."""
        state, self._pending_state = self._pending_state, None
        if state is None:
            return None
        if state["epoch"] != epoch:  # e.g. an end-of-epoch checkpoint: the next epoch starts fresh
            log.info("data position of epoch %d not used: this iteration is epoch %d", state["epoch"], epoch)
            return None
        self.counter.update(state["skipped"])
        return state

    # -- exact resume ---------------------------------------------------------------------------
    def local_state(self) -> dict[str, Any]:
        """This rank's position: epoch, batches consumed, the last position of each worker and the
        skip counts up to the last consumed batch."""
        consumed = self._handed_out if self.consumed_fn is None else min(self.consumed_fn(), self._handed_out)
        workers, last = list(self._settled), self._last_worker
        skipped = SkipCounter(dict(self.counter.skipped))
        for index, worker, position, delta in self._recent:
            if index < consumed:
                workers[worker], last = position, worker
            else:  # handed out ahead of the trainer: not consumed yet
                skipped.update({reason: -n for reason, n in delta.items()})
        return {"version": 1, "epoch": self._epoch, "batches": consumed, "num_workers": self.workers,
                "last_worker": last, "workers": workers, "skipped": skipped.skipped}

    def state_dict(self) -> dict[str, Any]:
        """``{"ranks": [local_state() of every rank]}`` (gathered when a process group runs)."""
        local = self.local_state()
        if self.dataset.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
            return {"ranks": ranks}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume this rank's position at the next ``iter()`` of the saved epoch (loading twice is harmless).

        Raises:
            ValueError: the checkpoint was written with another number of ranks or workers.
        """
        ranks = state_dict["ranks"]
        if len(ranks) != self.dataset.world_size:
            raise ValueError(f"the checkpoint's data position is for {len(ranks)} rank(s), this run has "
                             f"{self.dataset.world_size}: resume with the same number of devices")
        state = ranks[self.dataset.rank]
        if state["num_workers"] != self.workers:
            raise ValueError(f"the checkpoint's data position is for num_workers={state['num_workers']}, "
                             f"this run has {self.num_workers}: resume with the same num_workers")
        self._pending_state = state


class WebDataModule(pl.LightningDataModule):
    """Lightning data module over webdataset shards; subclasses say how a sample becomes a batch.

    Subclasses implement :meth:`example_fn` (sample → example, raising :class:`SkipSample`) and
    :meth:`collate_fn` (examples → batch); both must return picklable callables (they run in
    worker processes). Rank and world size come from the attached trainer (``global_rank``,
    ``world_size``) — never from ``torch.distributed`` defaults — or from :meth:`build_pipeline`'s
    arguments. Defaults live in the subclass signature; this one takes every value explicitly.

    Args:
        train: training sources, mixed by their ``weight``.
        val: validation sources (one DataLoader each when there are several).
        test: test sources (as ``val``).
        predict: prediction sources (as ``val``).
        batch_size: examples per batch and rank.
        num_workers: DataLoader worker processes per rank.
        epoch_samples: training samples per epoch over all ranks (needed for several ranks and for
            ``resampled``); ``None`` makes one pass over the training shards.
        shuffle_buffer: training shuffle buffer in samples (raw bytes, decoded after shuffling).
        resampled: draw training shards with replacement.
        seed: base seed for shard order, shuffle buffer and mixing (plus the epoch).
    """

    def __init__(
        self,
        *,
        train: Sequence[ShardSource] | None,
        val: Sequence[ShardSource] | None,
        test: Sequence[ShardSource] | None,
        predict: Sequence[ShardSource] | None,
        batch_size: int,
        num_workers: int,
        epoch_samples: int | None,
        shuffle_buffer: int,
        resampled: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.sources = {"fit": list(train or []), "validate": list(val or []),
                        "test": list(test or []), "predict": list(predict or [])}
        self.batch_size, self.num_workers = batch_size, num_workers
        self.epoch_samples, self.shuffle_buffer = epoch_samples, shuffle_buffer
        self.resampled, self.seed = resampled, seed
        self.skips = SkipCounter()
        self._epoch = 0
        self._train_loader: SkipCountingLoader | None = None
        self._train_position: dict[str, Any] | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def example_fn(self, stage: str, sources: Sequence[ShardSource]) -> ExampleFn:
        """A picklable ``(sample, index into sources) -> example`` for ``stage``."""
        raise NotImplementedError

    def collate_fn(self, stage: str) -> CollateFn:
        """A picklable ``list[example] -> batch`` for ``stage``."""
        raise NotImplementedError

    # -- skip counts ----------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, over all stages, as counted in this process so far."""
        return self.skips.skipped

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason (for logging); conversions are in :meth:`conversion_counts`."""
        return {r: n for r, n in self.skips.skipped.items() if not r.startswith(CONVERTED)}

    def conversion_counts(self) -> dict[str, int]:
        """Samples used after a conversion (``converted_cmyk``, ``converted_16bit``…) by kind."""
        return {r: n for r, n in self.skips.skipped.items() if r.startswith(CONVERTED)}

    # -- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"train_position": …}``: the training loader's data position, saved in every checkpoint.

        Kept here as well as in Lightning's fit-loop state because Lightning 2.6 does not hand a
        loader its state when ``configure_optimizers`` already built it (``estimated_stepping_batches``).
        """
        if self._train_loader is None:
            return {}
        return {"train_position": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the (current or next) training loader continue after the saved position."""
        position = state_dict.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(position)
        else:
            self._train_position = position

    # -- epochs and ranks -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Epoch used for reshuffling when no trainer is attached (the trainer's epoch wins)."""
        self._epoch = epoch

    def current_epoch(self) -> int:
        """The attached trainer's ``current_epoch``, else the value given to :meth:`set_epoch`."""
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def consumed_batches(self) -> int:
        """Training batches the attached trainer has run in the current epoch (``-1``: no trainer)."""
        if self.trainer is None:
            return -1
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def rank_and_world(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` from the attached trainer, ``(0, 1)`` without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # -- pipelines and loaders ------------------------------------------------------------------
    def build_pipeline(self, stage: str, sources: Sequence[ShardSource], *,
                       rank: int | None = None, world_size: int | None = None) -> ShardPipeline:
        """The :class:`ShardPipeline` of ``sources`` for ``stage`` (``"fit"`` trains) on one rank."""
        if rank is None or world_size is None:
            rank, world_size = self.rank_and_world()
        train = stage == "fit"
        return ShardPipeline(
            [s.urls for s in sources], [s.weight for s in sources],
            self.example_fn(stage, sources), self.collate_fn(stage),
            batch_size=self.batch_size, train=train, resampled=self.resampled,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch_samples=self.epoch_samples,
            rank=rank, world_size=world_size, num_workers=self.num_workers,
        )

    def make_loader(self, pipeline: ShardPipeline) -> SkipCountingLoader:
        """Wrap a pipeline in a :class:`SkipCountingLoader` feeding this module's counter."""
        epoch_fn = self.current_epoch if pipeline.train else None
        workers = self.num_workers
        if not pipeline.train:  # no more workers than this rank has shards of its smallest source
            workers = min(workers, min(len(urls) for urls in pipeline.urls) // pipeline.world_size)
        consumed_fn = self.consumed_batches if pipeline.train and self.trainer is not None else None
        return SkipCountingLoader(pipeline, self.skips, epoch_fn, consumed_fn, num_workers=workers,
                                  pin_memory=torch.cuda.is_available())

    def _eval_loaders(self, stage: str) -> SkipCountingLoader | list[SkipCountingLoader]:
        """One loader per source of ``stage``; a single loader when there is one source; ``[]`` for
        validation without sources (Lightning then skips validation)."""
        sources = self.sources[stage]
        if not sources and stage == "validate":
            return []  # fit without validation
        if not sources:
            raise ValueError(f"no {stage} sources were given to {type(self).__name__}")
        loaders = [self.make_loader(self.build_pipeline(stage, [s])) for s in sources]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> SkipCountingLoader:
        if not self.sources["fit"]:
            raise ValueError(f"no train sources were given to {type(self).__name__}")
        self._train_loader = self.make_loader(self.build_pipeline("fit", self.sources["fit"]))
        if self._train_position is not None:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None
        return self._train_loader

    def val_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("validate")

    def test_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> SkipCountingLoader | list[SkipCountingLoader]:
        return self._eval_loaders("predict")
