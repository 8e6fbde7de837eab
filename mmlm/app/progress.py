"""Progress of ``mmlm fit|validate|test|predict``: bars that know their totals, plain lines when nobody watches.

* :class:`RunProgressBar` (stdout is a terminal): Lightning's rich bar, with the training total from ``max_steps``
  and the epoch length (``epoch_samples``), no negative epoch count (Lightning writes ``Epoch 1/-2`` for a run
  bounded by steps), and evaluation totals from the sample count of the shards (:func:`estimated_batches`) where
  the loader has no length; the time column shows elapsed • remaining.
* :class:`PlainProgress` (stdout is a file or a pipe: batch jobs, ``mmlm quickstart > log``): one line every N
  optimizer steps (step, loss, learning rate, samples/s, ETA) and one line per evaluation.
* :func:`progress_bar_for` picks one of them for a stream.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tarfile
import time
from datetime import timedelta
from functools import lru_cache
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar

#: How many evaluation metrics one plain line shows (sorted by name; the rest are in the logger).
PLAIN_METRICS_SHOWN = 12
#: Metric name prefixes of evaluation (left out of the training lines).
EVAL_PREFIXES = ("val", "test", "predict")
#: The webdataset sample key of a tar member: its path up to the first dot of the file name.
SAMPLE_KEY = re.compile(r"^((?:.*/|)[^./]+)")


@lru_cache(maxsize=1024)
def _tar_samples(path: str, mtime_ns: int, size: int) -> int:
    """Samples (consecutive members sharing a key) in the tar file ``path``; headers only, the data is skipped."""
    samples, last = 0, None
    with tarfile.open(path) as tar:
        for member in tar:
            match = SAMPLE_KEY.match(member.name)
            if member.isfile() and match and match.group(1) != last:
                samples, last = samples + 1, match.group(1)
    return samples


def shard_samples(url: str) -> int | None:
    """Samples in one local shard (``file://`` or a path); ``None`` for a remote or unreadable one."""
    path = url.removeprefix("file://")
    if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
        return None
    try:
        stat = os.stat(path)
        return _tar_samples(path, stat.st_mtime_ns, stat.st_size)
    except (OSError, tarfile.TarError):
        return None


def estimated_batches(loader: Any) -> float:
    """Batches one rank draws from an evaluation loader over shards, from the shards' sample count:
    ``ceil(samples / (world_size × batch_size))``; ``inf`` when a shard is remote or the loader is not a shard
    pipeline (``loader.dataset`` with ``urls``, ``batch_size`` and ``world_size``)."""
    dataset = getattr(loader, "dataset", None)
    urls = getattr(dataset, "urls", None)
    if not urls or getattr(dataset, "train", False):
        return math.inf
    counts = [shard_samples(url) for group in urls for url in (group if isinstance(group, list) else [group])]
    if any(n is None for n in counts):
        return math.inf
    per_batch = max(1, getattr(dataset, "world_size", 1)) * max(1, getattr(dataset, "batch_size", 1))
    return max(1, math.ceil(sum(counts) / per_batch))


def current_loader(loaders: Any, index: int | None) -> Any:
    """The loader ``index`` of a trainer's evaluation loaders (one loader or a sequence of them)."""
    if isinstance(loaders, list | tuple):
        return loaders[index or 0] if loaders else None
    return loaders


def eval_total(batches: float, loaders: Any, index: int | None) -> float:
    """Lightning's batch count of an evaluation loader, or the shards' estimate where Lightning has ``inf``."""
    if batches != math.inf:
        return batches
    return estimated_batches(current_loader(loaders, index))


def remaining_train_batches(trainer: pl.Trainer) -> float:
    """Batches left until ``max_steps`` (optimizer steps × gradient accumulation); ``inf`` without ``max_steps``."""
    if trainer.max_steps is None or trainer.max_steps < 0:
        return math.inf
    return max(0, trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the totals of an mmlm run (see the module docstring)."""

    @property
    def total_train_batches(self) -> int | float:
        return min(self.trainer.num_training_batches, remaining_train_batches(self.trainer))

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        trainer = self.trainer
        if trainer.sanity_checking:
            return super().total_val_batches_current_dataloader
        return eval_total(super().total_val_batches_current_dataloader, trainer.val_dataloaders,
                          self._current_eval_dataloader_idx)

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        return eval_total(super().total_test_batches_current_dataloader, self.trainer.test_dataloaders,
                          self._current_eval_dataloader_idx)

    @property
    def total_predict_batches_current_dataloader(self) -> int | float:
        return eval_total(super().total_predict_batches_current_dataloader, self.trainer.predict_dataloaders,
                          self._current_eval_dataloader_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        return f"{description:{len(self.validation_description)}}"


def duration(seconds: float) -> str:
    """``h:mm:ss`` (``-`` for an unknown or infinite time)."""
    return str(timedelta(seconds=int(seconds))) if math.isfinite(seconds) and seconds >= 0 else "-"


def metric_text(name: str, value: Any) -> str:
    """``name value`` with 4 significant digits (a tensor is read as a float)."""
    value = float(value.item() if hasattr(value, "item") else value)
    return f"{name} {value:.4g}"


class PlainProgress(ProgressBar):
    """One plain line every ``every_n_steps`` optimizer steps and one per evaluation, for logs that are not a
    terminal::

        step 50/2000 | train/loss 2.312 | lr 1.2e-03 | 412 samples/s | ETA 0:04:43
        validation at step 600: 8 batches in 3 s | val/cider 0.803 | val/vqa_acc 0.535

    Args:
        every_n_steps: steps between training lines (``None``: the trainer's ``log_every_n_steps``).
        stream: where the lines go (``None``: ``sys.stdout`` at the time of writing).
    """

    def __init__(self, every_n_steps: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_n_steps, self.stream = every_n_steps, stream
        self._enabled = True
        self._start: tuple[float, int, int] = (0.0, 0, 0)  # time, step and samples when training (re)started
        self._samples = 0
        self._last_line_step = -1
        self._eval_start, self._eval_batches = 0.0, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Write one line (only when enabled, i.e. on rank 0)."""
        if self._enabled:
            print(*args, **kwargs, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step, self._samples)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += (len(batch) if hasattr(batch, "__len__") else 0) * trainer.world_size
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        step = trainer.global_step
        if step > 0 and step % every == 0 and step != self._last_line_step:
            self._last_line_step = step
            self.print(self.train_line(trainer, pl_module))

    def train_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """``step S/T | <progress-bar metrics> | lr X | N samples/s | ETA h:mm:ss``."""
        start, first_step, first_samples = self._start
        elapsed = max(time.monotonic() - start, 1e-9)
        done, total = trainer.global_step - first_step, trainer.estimated_stepping_batches
        parts = [f"step {trainer.global_step}/{total if math.isfinite(total) else '?'}"]
        parts += [metric_text(k, v) for k, v in self.get_metrics(trainer, pl_module).items()
                  if k != "v_num" and not k.startswith(EVAL_PREFIXES) and not isinstance(v, str | dict)]
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if self._samples > first_samples:
            parts.append(f"{(self._samples - first_samples) / elapsed:.0f} samples/s")
        parts.append(f"ETA {duration((total - trainer.global_step) * elapsed / done if done else math.inf)}")
        return " | ".join(parts)

    def _eval_started(self, *_: Any) -> None:
        self._eval_start, self._eval_batches = time.monotonic(), 0

    def _eval_batch_done(self, *_: Any, **__: Any) -> None:
        self._eval_batches += 1

    on_validation_start = on_test_start = on_predict_start = _eval_started
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _eval_batch_done

    def eval_line(self, trainer: pl.Trainer, what: str, prefix: str) -> str:
        """``<what> at step S: N batches in T s | <metrics starting with prefix>``."""
        seconds = time.monotonic() - self._eval_start
        head = f"{what} at step {trainer.global_step}: {self._eval_batches} batches in {seconds:.0f} s"
        metrics = sorted((k, v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix))
        shown = [metric_text(k, v) for k, v in metrics[:PLAIN_METRICS_SHOWN]]
        more = [f"… {len(metrics) - PLAIN_METRICS_SHOWN} more in the logger"] if len(metrics) > PLAIN_METRICS_SHOWN else []
        return " | ".join([head, *shown, *more])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.print(self.eval_line(trainer, "validation", "val"))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(self.eval_line(trainer, "test", "test"))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.print(self.eval_line(trainer, "prediction", "predict"))


def progress_bar_for(stream: TextIO) -> ProgressBar:
    """:class:`RunProgressBar` when ``stream`` is a terminal, else :class:`PlainProgress` writing to it."""
    return RunProgressBar() if stream.isatty() else PlainProgress()
