"""The loader: a ``DataLoader`` over a :class:`~datamodules.pipeline.shard_pipeline.ShardPipeline` that tallies skips, keeps the
data position for exact resume and refuses empty training epochs.

:class:`SkipCountingLoader` runs in the main process: it adds each :class:`~datamodules.pipeline.skips.CountedBatch`'s
counts to the data module's :class:`~datamodules.pipeline.skips.SkipCounter` and hands only ``item.batch`` on.

Exact resume: each batch carries its worker's position after it (:class:`datamodules.pipeline.streams.WorkerStream`). The
loader keeps the position of the last batch the trainer consumed per worker and returns it from ``state_dict()``
(Lightning stores it in the checkpoint as the fit loop's ``combined_loader`` state, the data module in its own);
``load_state_dict()`` makes the next ``iter()`` of the same epoch continue after the last consumed batch. See
``docs/reliability.md``.

Never hang: a training epoch that yields no batch (an empty tar, only bad samples, fewer usable samples than a
batch) raises :class:`EmptyEpochError` naming the sources and the epoch's skip counts, instead of letting the
trainer start empty epochs forever.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader

from datamodules.pipeline.shard_pipeline import ShardPipeline
from datamodules.pipeline.skips import CountedBatch, SkipCounter, counts_since

log = logging.getLogger(__name__)

#: Batches the loader remembers beyond the trainer's consumed count (Lightning prefetches at most one).
PENDING_BATCHES = 16


class EmptyEpochError(RuntimeError):
    """A training epoch yielded no batch: the run stops instead of starting empty epochs forever."""


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
