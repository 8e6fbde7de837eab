"""Stream positions and mixing: the raw samples one DataLoader worker reads in one epoch, and where it stands.

Inside one worker (plain generators, raw bytes: decoding comes after, in the pipeline)::

    this rank's and worker's shards of each source (split) ─► tar reader ─► SourceStream per source
      ─► weighted mix of sources (weighted_mix) ─► shuffle buffer (shuffled)          = WorkerStream

Exact resume: a :class:`WorkerStream`'s position (per source ``[pass, shard, offset]``, the mixing and
shuffle-buffer RNG states, raw samples drawn) travels with every batch the worker yields; restoring it continues
after that batch (a direct seek without a shuffle buffer, a decode-free replay checked against the saved position
with one). Epoch length: :func:`batches_per_rank` full batches per rank (equal on every rank, so DDP stays in
step), shared out over the workers by :func:`batches_per_worker`. See ``docs/reliability.md``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import webdataset as wds

from datamodules.pipeline.skips import TAR_ERROR, SkipCounter

if TYPE_CHECKING:
    from datamodules.pipeline.shard_pipeline import ShardPipeline

log = logging.getLogger(__name__)

#: One raw webdataset sample: ``{"__key__", "__url__", "__source__", extension: bytes…}``.
Sample = dict[str, Any]
#: ``url -> readable byte stream of a tar``: how a pipeline opens its shards (picklable: workers receive it).
Opener = Callable[[str], IO[bytes]]


def open_shard(url: str) -> IO[bytes]:
    """webdataset's opener: local paths, ``pipe:`` commands, ``http(s)://`` and the object stores it knows."""
    return wds.gopen(url)


def tar_samples(url: str, opener: Opener, handler: Callable[[Exception], bool]) -> Iterator[Sample]:
    """The samples of one tar shard opened with ``opener``; errors go to ``handler`` as in webdataset (an opening
    error the handler accepts yields nothing)."""
    try:
        stream = opener(url)
    except Exception as exn:  # noqa: BLE001 - the handler decides, as webdataset's url_opener does
        exn.args = (*exn.args, url)
        if handler(exn):
            return
        raise
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    yield from wds.tariterators.group_by_keys(files, handler=handler)


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
                for n, sample in enumerate(tar_samples(shards[shard], self.pipeline.opener, self._on_error), 1):
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
