"""Run-level reliability: the end-of-run data report and the checks and defaults of ``mmlm fit``.

* :class:`DataReport` (a default callback of the ``mmlm`` CLI) sums the datamodule's per-reason
  counts of skipped and converted samples over all ranks at the end of fit/validate/test, logs
  them (``data/total_skipped``, ``data/total_skipped_<reason>``, ``data/total_converted_<kind>``; the
  table as text ``data_report/<stage>``, :func:`mmlm.app.loggers.log_text`), prints the table and
  writes ``data_report-<stage>.json`` into the trainer's log directory.
* :func:`config_problem` finds missing local shard paths, raw source files and folders (questions,
  annotations, captions files, image folders, Donut folders) and ``--ckpt_path`` files in a parsed
  config, before any model, datamodule or trainer is built.
* :func:`add_trainer_defaults` adds the atomic checkpoint writer and the data report to the
  trainer's arguments unless the config already chose them; :data:`TRAINER_ARGUMENT_DEFAULTS` are the
  trainer defaults the CLI changes (validation every N steps across epochs).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from datamodules.config_checks import source_problem
from datamodules.formats.donut_folder import METADATA
from datamodules.formats.raw import folder_images, is_raw, path_problem
from datamodules.pipeline.skips import CONVERTED
from datamodules.pipeline.urls import check_local_shards, expand_urls
from mmlm.app.loggers import log_text
from mmlm.checkpointing import AtomicCheckpointIO, CheckpointError, checkpoint_problem, is_local
from mmlm.hub import looks_local

log = logging.getLogger(__name__)

#: ``--ckpt_path`` values Lightning resolves itself (not file names).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
#: Strategies that write sharded checkpoints with their own I/O (no ``CheckpointIO`` plugin added).
OWN_CHECKPOINT_IO = ("deepspeed", "fsdp")


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Add per-reason counts over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)
    total: dict[str, int] = {}
    for part in parts:
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


def format_report(stage: str, counts: dict[str, int]) -> str:
    """A plain-text table of skipped and converted samples per reason."""
    skipped = {r: n for r, n in sorted(counts.items()) if not r.startswith(CONVERTED)}
    converted = {r: n for r, n in sorted(counts.items()) if r.startswith(CONVERTED)}
    lines = [f"data report ({stage}): {sum(skipped.values())} samples skipped, "
             f"{sum(converted.values())} converted"]
    width = max((len(r) for r in counts), default=6)
    for title, part in (("skipped", skipped), ("converted", converted)):
        if part:
            lines.append(f"  {title:<{width}}  count")
            lines += [f"  {r:<{width}}  {n:>5}" for r, n in part.items()]
    return "\n".join(lines)


def log_running_counts(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Log this rank's running count of skipped samples per reason as ``data/skipped_<reason>`` (rank 0's value is
    kept): the datamodule's ``skip_counts()``, read here so that no model reads its datamodule."""
    counts = getattr(trainer.datamodule, "skip_counts", dict)()
    for reason, count in counts.items():
        pl_module.log(f"data/skipped_{reason}", float(count), rank_zero_only=True)


class DataReport(pl.Callback):
    """End-of-run summary of skipped and converted samples (see the module docstring).

    The counts are the datamodule's (``skip_counts()`` + ``conversion_counts()``, as in
    :class:`datamodules.base.WebDataModule`) summed over ranks; after a resume they include the
    counts restored from the checkpoint. ``reports`` keeps each stage's totals.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reports: dict[str, dict[str, int]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.log_every_n_steps == 0:
            log_running_counts(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_running_counts(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_running_counts(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_running_counts(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer, "fit")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.report(trainer, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer, "test")

    def report(self, trainer: pl.Trainer, stage: str) -> dict[str, int]:
        """Sum, log, print and write the counts of ``stage``; returns them."""
        datamodule = trainer.datamodule
        counts = {**getattr(datamodule, "skip_counts", dict)(), **getattr(datamodule, "conversion_counts", dict)()}
        counts = sum_over_ranks(counts)
        self.reports[stage] = counts
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self._publish(trainer, stage, counts, log_dir)
        return counts

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer, stage: str, counts: dict[str, int], log_dir: str | None) -> None:
        metrics = {f"data/total_{r if r.startswith(CONVERTED) else 'skipped_' + r}": float(n) for r, n in counts.items()}
        metrics["data/total_skipped"] = float(sum(n for r, n in counts.items() if not r.startswith(CONVERTED)))
        text = format_report(stage, counts)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            log_text(logger, f"data_report/{stage}", text)
            logger.save()
        print(text, flush=True)
        if log_dir is not None:
            out = Path(log_dir) / f"data_report-{stage}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(counts, indent=1, sort_keys=True))


# -- checks before anything is built ---------------------------------------------------------------


def as_plain(value: Any) -> Any:
    """jsonargparse ``Namespace`` → nested dicts/lists (other values unchanged)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def is_path_key(name: str) -> bool:
    """Whether a config key names data to read: ``urls``, ``*_urls``, ``path``, ``*_path`` (not ``class_path``)."""
    return name in ("urls", "path") or (name.endswith(("_urls", "_path")) and name != "class_path")


def path_entries(node: Any, key: str = "data") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(dotted key, value, the dict holding it)`` of every ``urls`` / ``*_urls`` / ``path`` / ``*_path`` entry
    under ``node``."""
    node = as_plain(node)
    if isinstance(node, dict):
        for name, value in node.items():
            dotted = f"{key}.{name}"
            if is_path_key(name) and value is not None:
                yield dotted, value, node
            else:
                yield from path_entries(value, dotted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from path_entries(value, f"{key}[{i}]")


def shard_problem(key: str, urls: Any) -> str | None:
    """Why the shard pattern at ``key`` cannot be read (no match, missing files), else ``None``."""
    try:
        check_local_shards(expand_urls(urls))
    except (FileNotFoundError, ValueError) as err:
        return f"{key}={urls!r}: {err}"
    return None


def raw_source_problem(key: str, urls: str, source: dict[str, Any]) -> str | None:
    """Why the raw source whose ``urls`` is at ``key`` cannot be read: its file, ``annotations`` file or ``images``
    folder is missing (named with its key), else ``None``."""
    prefix = key.rsplit(".", 1)[0]
    for name, value, folder in (("urls", urls, False), ("annotations", source.get("annotations"), False),
                                ("images", source.get("images"), True)):
        if problem := path_problem(value, folder):
            return f"{prefix}.{name}={value!r}: {problem}"
    return None


def document_path_problem(key: str, path: Any) -> str | None:
    """Why a document source ``path`` (Donut folder, image folder, shard folder or shard pattern) cannot be read."""
    if not isinstance(path, str) or any(c in path for c in "*?[{") or "://" in path:
        return shard_problem(key, path)
    folder = Path(path)
    if not folder.exists():
        return f"{key}={path!r}: no such folder or shard"
    if folder.is_dir() and not ((folder / METADATA).is_file() or any(folder.glob("*.tar")) or folder_images(folder)):
        return f"{key}={path!r}: the folder holds no {METADATA}, no images and no *.tar shards"
    return None


def entry_problem(key: str, value: Any, holder: dict[str, Any]) -> str | None:
    """Why the path entry at ``key`` cannot be read (see :func:`config_problem`), else ``None``."""
    name = key.rsplit(".", 1)[-1]
    if name == "path" or name.endswith("_path"):
        return document_path_problem(key, value)
    if name == "urls" and is_raw(value, holder.get("format")):
        return raw_source_problem(key, value, holder)
    return shard_problem(key, value)


#: Files of which a saved tokenizer folder holds at least one (``save_pretrained`` of a fast or slow tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


def tokenizer_entries(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """``(dotted key, value)`` of every string ``tokenizer`` / ``*_tokenizer`` entry under ``node``."""
    if isinstance(node, dict):
        for name, value in node.items():
            if (name == "tokenizer" or name.endswith("_tokenizer")) and isinstance(value, str):
                yield f"{key}.{name}", value
            else:
                yield from tokenizer_entries(value, f"{key}.{name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from tokenizer_entries(value, f"{key}[{i}]")


def tokenizer_problem(config: dict[str, Any]) -> str | None:
    """Why a tokenizer folder named in the model or data section cannot be loaded: a local path that does not
    exist, or a folder without any tokenizer file (an empty folder); hub ids are left to the hub."""
    for section in ("model", "data"):
        for key, value in tokenizer_entries(config.get(section), section):
            path = Path(value)
            if looks_local(value) and not path.exists():
                return f"{key}={value!r}: no such tokenizer folder"
            if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
                what = "an empty folder" if not any(path.iterdir()) else "a folder without tokenizer files"
                return (f"{key}={value!r} is {what}: expected a tokenizer saved with save_pretrained (one of "
                        f"{', '.join(TOKENIZER_FILES[:2])}, …), e.g. the tokenizer/ of mmlm data synth-shapes")
    return None


def is_fit_config(config: dict[str, Any]) -> bool:
    """Whether a parsed config is that of ``fit`` (a subcommand's config has ``ckpt_path``; validate and test add
    ``verbose``, predict ``return_predictions``; ``LightningCLI(run=False)`` has none of them and runs nothing)."""
    return "ckpt_path" in config and "verbose" not in config and "return_predictions" not in config


def schedule_problem(config: dict[str, Any]) -> str | None:
    """Why ``fit`` cannot size the warmup + decay schedule (``MultimodalModule.configure_optimizers`` needs the
    run's length in steps): no ``trainer.max_steps``, no integer ``limit_train_batches`` and a data module making one
    pass of unknown length (its ``epoch_samples`` unset), so ``max_epochs`` cannot be turned into steps."""
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    init_args = data.get("init_args") if isinstance(data, dict) else None
    if not is_fit_config(config) or not isinstance(init_args, dict) or "epoch_samples" not in init_args:
        return None
    if trainer.get("max_steps") not in (None, -1) or init_args.get("epoch_samples") is not None:
        return None
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):  # an epoch of `limit` batches: a known length
        return None
    epochs = trainer.get("max_epochs")
    given = f"trainer.max_epochs={epochs} without trainer.max_steps" if epochs is not None else "no trainer.max_steps"
    return (f"{given}, and data.init_args.epoch_samples is not set: the learning-rate "
            "schedule (warmup, then cosine or linear decay) needs the run's length in steps, and a one-pass epoch over shards has no "
            "known length. Set --trainer.max_steps=N, or --data.init_args.epoch_samples=N (with max_epochs)")


def config_problem(config: Any) -> str | None:
    """The first problem of a parsed ``fit/validate/test/predict`` config, named with its key, found before anything
    is built: a data source its own class refuses (wrong ``kind`` or ``format``, :func:`datamodules.config_checks.
    source_problem`); missing paths — shards (``urls``, ``*_urls``; a folder is refused, naming the patterns of the
    shards in it), raw sources (their file, ``annotations`` file and ``images`` folder), document paths (``path``,
    ``*_path``); ``ckpt_path``; a tokenizer folder that is missing or empty; ``fit`` without a known length for the
    LR schedule. Only existence is checked for paths (no file is parsed)."""
    config = as_plain(config)
    if problem := source_problem(config.get("data")):
        return problem
    for key, value, holder in path_entries(config.get("data")):
        if problem := entry_problem(key, value, holder):
            return problem
    ckpt = config.get("ckpt_path")
    if ckpt is not None and str(ckpt) not in SPECIAL_CKPT_PATHS and is_local(ckpt):
        if problem := checkpoint_problem(ckpt):
            return f"ckpt_path={str(ckpt)!r}: {problem}"
    return tokenizer_problem(config) or schedule_problem(config)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest readable checkpoint under ``root`` (any depth; ``last*.ckpt`` before others of the same age);
    ``None`` when none. A newer file that is not a complete checkpoint (a save cut short) is passed over with a
    warning naming it and what is wrong."""
    files = [p for p in root.rglob("*.ckpt") if p.is_file()] if root.is_dir() else []
    for path in sorted(files, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True):
        if (problem := checkpoint_problem(path)) is None:
            return path
        log.warning("skipping checkpoint %s for --ckpt_path last: %s", path, problem)
    return None


def last_checkpoint(config: Any) -> Path | None:
    """For ``ckpt_path: last``: the newest readable checkpoint (:func:`newest_checkpoint`, which passes over files
    cut short with a warning) in the ``dirpath`` of the config's checkpoint callbacks, else under the trainer's
    ``default_root_dir`` (Lightning alone would look only in the new run's empty version folder and start from
    scratch, and would take a truncated ``last.ckpt`` as it is); ``None`` when nothing was saved yet.

    Raises:
        CheckpointError: checkpoints are there but none can be read.
    """
    config = as_plain(config)
    if config.get("ckpt_path") != "last":
        return None
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    folders = [Path(c["init_args"]["dirpath"]) for c in callbacks
               if isinstance(c, dict) and (c.get("init_args") or {}).get("dirpath")]
    folders = folders or [Path(trainer.get("default_root_dir") or ".")]
    found = [path for folder in folders if (path := newest_checkpoint(folder)) is not None]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    broken = [path for folder in folders if folder.is_dir() for path in folder.rglob("*.ckpt") if path.is_file()]
    if broken:  # Lightning's own lookup would load one of them and fail with a traceback
        raise CheckpointError(f"--ckpt_path last: none of the {len(broken)} checkpoint(s) under "
                              f"{', '.join(map(str, folders))} can be read (each is named in a warning above); "
                              "move them away to start from scratch, or give --ckpt_path a readable file")
    return None


# -- trainer defaults ----------------------------------------------------------------------------


def strategy_name(strategy: Any) -> str:
    """Lower-case name of a strategy given as string or instance."""
    return (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()


#: Trainer arguments whose default the ``mmlm`` CLI changes (set as parser defaults, so a config file or the command
#: line still overrides them and ``--print_config`` shows them). ``check_val_every_n_epoch: null`` makes an integer
#: ``val_check_interval`` count training batches over the whole run (Lightning 2.6: its ``total_batch_idx``; with
#: ``accumulate_grad_batches: 1`` these are the optimizer steps), so validation runs every N steps whatever the
#: epoch length; Lightning's default 1 counts within each epoch and refuses an interval longer than an epoch.
TRAINER_ARGUMENT_DEFAULTS: dict[str, Any] = {"check_val_every_n_epoch": None}


def epoch_fraction_validation(config: dict[str, Any]) -> None:
    """A fractional ``val_check_interval`` (a float: part of an epoch) is counted within epochs: put
    ``check_val_every_n_epoch`` back to Lightning's 1 where the step-counting default (``None``) would make
    Lightning refuse the fraction. Integer and time-based intervals are left alone."""
    if config.get("check_val_every_n_epoch") is None and isinstance(config.get("val_check_interval"), float):
        config["check_val_every_n_epoch"] = 1


class FinalCheckpoint(pl.Callback):
    """Save a checkpoint of the last step when a run ends without one.

    Lightning's ``ModelCheckpoint`` saves after validation (and, with validation every epoch, at epoch ends); a run
    that validates every N steps across epochs, never reaches its next validation or has validation turned off would
    otherwise end with its trained weights unsaved. The file is named and placed as ``ModelCheckpoint`` names its
    own (``epoch=E-step=S.ckpt`` in its folder); nothing is written when a checkpoint of that step exists.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if callback is None or trainer.global_step == 0 or callback.dirpath is None:
            return
        if any(Path(callback.dirpath).glob(f"*step={trainer.global_step}*.ckpt")):
            return
        path = callback.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step})
        trainer.save_checkpoint(path, weights_only=False)


class Preemption(pl.Callback):
    """A preempted run (SIGTERM; SIGUSR1 where nothing else handles it, e.g. SLURM's ``--signal=USR1@…`` outside
    Lightning's own SLURM requeueing) saves a checkpoint of the step it stopped at — the exact data position
    included — as ``last.ckpt`` in the checkpoint folder, so ``--ckpt_path last`` continues batch for batch. The
    ``mmlm`` command then exits with status 143 (128 + SIGTERM), never 0, so a scheduler sees the job unfinished.

    Lightning stops a run that received SIGTERM after the batch in flight (``SIGTERMException`` in every rank, after a
    broadcast); this callback saves in ``on_exception``, on every rank as a checkpoint save requires.
    """

    def __init__(self) -> None:
        self._previous: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn SIGUSR1 into SIGTERM when the signal is not handled already (its default would kill the process)."""
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(usr1) in (signal.SIG_DFL, None):
            self._previous = signal.signal(usr1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            path = preemption_path(trainer)
            trainer.save_checkpoint(str(path), weights_only=False)
            rank_zero_only(log.warning)("preempted (SIGTERM) at global step %d: saved %s; resume with "
                                        "--ckpt_path last", trainer.global_step, path)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None


def preemption_path(trainer: pl.Trainer) -> Path:
    """``last.ckpt`` in the checkpoint callback's folder (else the trainer's ``default_root_dir``)."""
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
    return folder / "last.ckpt"


def add_trainer_defaults(config: dict[str, Any], callbacks: list[pl.Callback]) -> None:
    """Add :class:`AtomicCheckpointIO` (unless a ``CheckpointIO`` plugin is given or the strategy
    writes its own sharded checkpoints), :class:`DataReport`, :class:`FinalCheckpoint` and :class:`Preemption` (unless
    present), and count a fractional
    ``val_check_interval`` per epoch (:func:`epoch_fraction_validation`), in place."""
    epoch_fraction_validation(config)
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    own_io = any(name in strategy_name(config.get("strategy", "auto")) for name in OWN_CHECKPOINT_IO)
    if not own_io and not any(isinstance(p, CheckpointIO) for p in plugins):
        config["plugins"] = [*plugins, AtomicCheckpointIO()]
    given = list(config.get("callbacks") or []) + list(callbacks)
    if not any(isinstance(c, DataReport) for c in given):
        callbacks.append(DataReport())
    if not any(isinstance(c, FinalCheckpoint) for c in given):
        callbacks.append(FinalCheckpoint())
    if not any(isinstance(c, Preemption) for c in given):
        callbacks.append(Preemption())
