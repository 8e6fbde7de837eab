"""Skip accounting: samples dropped or converted, counted per reason, carried to the main process with the batches.

An example function raises :class:`SkipSample` to drop one sample; the pipeline counts it under its ``reason`` in a
:class:`SkipCounter` (:func:`log_skip`: the first of each reason is logged at WARNING, later ones at DEBUG). A sample
used after a repair is counted as a *note* whose name starts with :data:`CONVERTED` (``converted_cmyk``,
``converted_missing_image``…); conversions are reported apart from skips.

Counts cross the process boundary *with the batches*: every DataLoader worker yields :class:`CountedBatch` items (a
collated batch plus the counts since the worker's previous item), and :class:`datamodules.pipeline.loader.SkipCountingLoader`
adds each item's counts to the data module's counter and hands only ``item.batch`` on. Counts of samples skipped
after a worker's last batch travel in one final item whose ``batch`` is ``None``; the loader swallows it.

Notes are collected explicitly, one sample at a time. A decoder deep inside an example function
(``transforms.to_rgb``, ``interleaved.available_image``, the k-shot demo picker) calls :func:`note`; the note is
added to the counter of the innermost enclosing ``with collecting_notes(counter):`` block, and dropped when no block
is open (``mmlm data make-shards`` calls ``to_rgb`` outside any pipeline). The pipeline
(:meth:`datamodules.pipeline.shard_pipeline.ShardPipeline._examples`) opens a fresh block around each ``to_example`` call and adds
its counts to the worker's counter only when the sample became an example, so the notes of a skipped sample are
dropped with it. The open block is found through a :class:`contextvars.ContextVar` that holds no counts itself: it
is set and reset around that one call (never across a ``yield``), so no counter outlives its sample, and pipelines,
threads and tests never share one. Passing the counter as an argument instead would change the signature of every
example function and of each helper between it and the decoders (``ImageTransform`` → ``decode_image`` →
``to_rgb``) without changing what is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: A worker that skips this many samples in a row raises instead of spinning forever.
MAX_CONSECUTIVE_SKIPS = 1000
#: Reason under which tar read errors (truncated archive, duplicate member, unreadable shard) are counted.
TAR_ERROR = "tar_error"
#: Counted events with this prefix are conversions (the sample was used), not skips.
CONVERTED = "converted_"


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


#: The counter of the innermost open :func:`collecting_notes` block (``None``: notes are dropped).
_COLLECTOR: ContextVar[SkipCounter | None] = ContextVar("datamodules_note_collector", default=None)


@contextmanager
def collecting_notes(counter: SkipCounter | None = None) -> Iterator[SkipCounter]:
    """Send the :func:`note` calls made inside the block to ``counter`` (a new one by default) and yield it.

    Blocks nest (the inner one collects); the previous collector is restored when the block exits, also on an
    exception, e.g. ``with collecting_notes() as notes: decode_image(data)`` then ``notes.skipped``.
    """
    counter = SkipCounter() if counter is None else counter
    token = _COLLECTOR.set(counter)
    try:
        yield counter
    finally:
        _COLLECTOR.reset(token)


def note(event: str) -> None:
    """Count a non-fatal event of the sample being decoded, e.g. ``note("converted_cmyk")``.

    Called by decoders (``datamodules.pipeline.transforms``, ``datamodules.interleaved``); the event goes to the counter of
    the enclosing :func:`collecting_notes` block, which the pipeline opens per sample; without one it is dropped.
    """
    counter = _COLLECTOR.get()
    if counter is not None:
        counter.add(event)


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


def counts_since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """Per-reason counts added between two snapshots of a counter (zero deltas left out)."""
    delta = {reason: n - before.get(reason, 0) for reason, n in now.items()}
    return {reason: n for reason, n in sorted(delta.items()) if n}


def log_skip(counter: SkipCounter, reason: str, detail: str, sample: Mapping[str, Any]) -> None:
    """Count one skipped sample; the first of each reason is logged at WARNING, later ones at DEBUG."""
    level = logging.WARNING if reason not in counter.skipped else logging.DEBUG
    counter.add(reason)
    log.log(level, "skipped sample %r in %r: %s %s", sample.get("__key__"), sample.get("__url__"), reason, detail)
