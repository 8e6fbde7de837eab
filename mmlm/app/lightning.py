"""LightningCLI over every mmlm model and datamodule, with mmlm's trainer defaults and the checks that run before
any work (``mmlm fit|validate|test|predict``)."""

from __future__ import annotations

import inspect
import logging
import os
import pydoc
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import ArgumentParser
from pytorch_lightning import Callback, LightningDataModule, Trainer
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI

from mmlm.app.loggers import LoggedConfig, default_loggers, logger_problem, with_run_folder
from mmlm.app.progress import progress_bar_for
from mmlm.app.reliability import (
    TRAINER_ARGUMENT_DEFAULTS,
    add_trainer_defaults,
    config_problem,
    last_checkpoint,
)
from mmlm.checkpointing import CheckpointError
from mmlm.language.base import GenerationConfig
from mmlm.models.base import MultimodalModule

#: The model settings of :class:`MultimodalModule`'s own optimiser and schedule (named when ``--optimizer`` is refused).
MODEL_OPTIMIZER_SETTINGS = ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "betas", "schedule")
#: Warnings mmlm causes on purpose (message patterns): frozen parts stay in eval mode, shard loaders have a length
#: (``epoch_samples``) and are split per worker, and ``mmlm quickstart`` runs LightningCLI from Python.
INTENDED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"Your `IterableDataset` has `__len__` defined",
    r"LightningCLI's args parameter is intended",
    # epoch metrics are reduced over the ranks by the evaluators themselves (every rank logs the same value)
    r"It is recommended to use `self\.log\('(val|test)/",
)
#: Deprecation warning categories silenced when they come from a dependency (mmlm's own still show).
DEPENDENCY_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
#: Strategies Lightning runs on GPUs only (its FSDPStrategy refuses a CPU accelerator; DeepSpeed needs CUDA).
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")


def optimizer_problem(config: Any) -> str | None:
    """Why LightningCLI's ``--optimizer``/``--lr_scheduler`` are refused when given, else ``None``.

    Lightning would replace the model's ``configure_optimizers`` by them, silently dropping the model's AdamW with
    decay/no-decay groups and its warmup + cosine (or linear) schedule; the model's own settings are named instead.
    """
    given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
    if not given:
        return None
    settings = ", ".join(f"--model.init_args.{name}" for name in MODEL_OPTIMIZER_SETTINGS)
    return (f"{' and '.join(given)} would replace the model's own optimiser (AdamW over decay/no-decay parameter "
            f"groups) and its warmup + cosine (or linear) schedule; mmlm refuses them. Set the model's settings instead: {settings}")


def strategy_label(strategy: Any) -> str:
    """A strategy as written in a parsed config: its name, or the ``class_path`` of ``class_path`` + ``init_args``."""
    return str(strategy.get("class_path") if hasattr(strategy, "get") else strategy)


def device_problem(config: Any) -> str | None:
    """Why the parsed ``trainer`` section cannot run on this machine for want of a GPU, else ``None``.

    Checked before the model is built (which may download gigabytes), for an explicit GPU accelerator or a
    GPU-only strategy on a machine without CUDA.
    """
    if torch.cuda.is_available():
        return None
    accelerator = str(config.get("trainer.accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return (f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; use --trainer.accelerator=auto "
                "(every visible GPU, else the CPU) or cpu")
    strategy = strategy_label(config.get("trainer.strategy") or "auto")
    if any(name in strategy.lower() for name in GPU_ONLY_STRATEGIES):
        return (f"trainer.strategy={strategy} runs on GPUs only and this machine has none; to run on the CPU use "
                "--trainer.strategy=ddp (or leave the strategy config out)")
    return None


def generation_problem(config: Any) -> str | None:
    """Why ``model.init_args.generation`` cannot become a :class:`GenerationConfig` (naming the field), else ``None``;
    checked before the model's parts are built."""
    settings = config.get("model.init_args.generation")
    if settings is None or not hasattr(settings, "as_dict"):
        return None
    try:
        GenerationConfig(**settings.as_dict())
    except (TypeError, ValueError) as err:
        return f"model.init_args.generation: {err}"
    return None


class NoTips(logging.Filter):
    """Drops Lightning's advertising lines ("💡 Tip: … try installing litlogger/litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_messages(stream: Any = None) -> None:
    """Silence what is noise in an mmlm run, keeping real warnings: Lightning's tips, deprecation warnings raised
    from dependencies' code, :data:`INTENDED_WARNINGS`, and (when ``stream``, default stderr, is not a terminal)
    transformers' per-file progress bars ("Loading weights", "Writing model shards")."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, NoTips) for f in log.filters):
            log.addFilter(NoTips())
    for category in DEPENDENCY_DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=r"(?!mmlm\b|datamodules\b)")
    for message in INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not (stream or sys.stderr).isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()


def add_logging_defaults(config: dict[str, Any], callbacks: list[Callback]) -> None:
    """The default loggers (:func:`mmlm.app.loggers.default_loggers`) where the trainer's ``logger`` is left at
    ``True`` (or ``None``, Lightning's default meaning the same), a CSV logger first when the chosen loggers start
    with neither TensorBoard nor CSV (:func:`mmlm.app.loggers.with_run_folder`), and a progress display for stdout (:func:`mmlm.app.progress.progress_bar_for`) unless the progress bar is
    turned off or one is given; in place."""
    root = config.get("default_root_dir") or os.getcwd()
    if config.get("logger") in (None, True):
        config["logger"] = default_loggers(root)
    elif config.get("logger") is not False:  # the run's own folder first (see with_run_folder)
        given = config["logger"]
        config["logger"] = with_run_folder(list(given) if isinstance(given, (list, tuple)) else [given], root)
    given = list(config.get("callbacks") or []) + list(callbacks)
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        callbacks.append(progress_bar_for(sys.stdout))


class MMLMCLI(LightningCLI):
    """LightningCLI that checks the config before building anything (``--optimizer``/``--lr_scheduler`` refused,
    GPU settings on a machine without one, decoding settings, missing shard and checkpoint paths), changes the
    trainer defaults of :data:`mmlm.app.reliability.TRAINER_ARGUMENT_DEFAULTS` and adds the reliability defaults
    (atomic checkpoint writes, end-of-run data report; ``mmlm.app.reliability``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Trainer defaults of mmlm (a config file or the command line still overrides them)."""
        parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_ARGUMENT_DEFAULTS.items()})

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if problem := logger_problem(config.get("trainer.logger")):  # one line, not the 85-line import trace
            print(f"mmlm {self.subcommand or 'fit'}: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        if problem := (optimizer_problem(config) or device_problem(config) or generation_problem(config)
                       or config_problem(config)):
            self._parser(self.subcommand).error(problem)
        if "weights_only" in config:  # how Lightning loads --ckpt_path: never by unpickling arbitrary objects
            if config.weights_only is False:
                self._parser(self.subcommand).error(
                    "--weights_only=false: mmlm loads checkpoints with torch.load(weights_only=True) only (unpickling "
                    "an untrusted checkpoint runs its code); mmlm's own checkpoints hold plain data")
            config.weights_only = True
        try:
            found = last_checkpoint(config)
        except CheckpointError as err:
            self._parser(self.subcommand).error(str(err))
        if found is not None:
            print(f"mmlm: --ckpt_path last → {found}", file=sys.stderr)
            config.ckpt_path = str(found)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        add_trainer_defaults(config, callbacks)
        add_logging_defaults(config, callbacks)
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """The model of ``--ckpt_path``'s hyperparameters only when the user gave none.

        Lightning merges a checkpoint's hyperparameters over the parsed config, so they would silently win over the
        user's config file and command line (``--model.init_args.generation…`` for an evaluation). With a model
        config given it is the truth (the weights load strictly, so a mismatch is named); without one, the model is
        rebuilt from the checkpoint's recorded config (``mmlm validate --ckpt_path X --data …``)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is None or config.get("model") is None:
            super()._parse_ckpt_path()


def import_every_family_and_datamodule() -> None:
    """Import every class that ``mmlm.models`` and ``datamodules`` export, so ``mmlm fit --help`` lists each family
    and datamodule as an accepted ``class_path`` (``datamodules`` imports its modules lazily)."""
    import datamodules
    import mmlm.models

    for package in (mmlm.models, datamodules):
        for name in package.__all__:
            getattr(package, name)


#: The options whose ``--X.help CLASS_PATH`` shows a class's (or a constructor function's) arguments.
HELP_OPTIONS = ("--model.help", "--data.help")


def constructor_help(args: Sequence[str]) -> str | None:
    """The help of ``--model.help``/``--data.help`` naming a function or classmethod that builds the model or data
    module (``mmlm.models.Blip2.from_hf``), which jsonargparse's help refuses (it takes classes only); ``None`` when
    the arguments ask for no such help."""
    for i, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option in HELP_OPTIONS and not value and i + 1 < len(args):
            value = args[i + 1]
        if option not in HELP_OPTIONS or "." not in value:
            continue
        target = pydoc.locate(value)
        if target is None or inspect.isclass(target) or not callable(target):
            return None
        parser = ArgumentParser(prog=f"mmlm {args[0]}", description=f"Help for {option}={value}")
        parser.add_function_arguments(target, option.removeprefix("--").removesuffix(".help") + ".init_args")
        return parser.format_help()
    return None


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI over every ``MultimodalModule`` and datamodule.

    The resolved config is written next to the run's checkpoints and may overwrite an older one,
    so re-running into the same directory works. Missing shard or ``--ckpt_path`` files stop the
    command before any class is built; checkpoints are written atomically
    (:class:`mmlm.checkpointing.AtomicCheckpointIO`) and :class:`mmlm.app.reliability.DataReport`
    summarises skipped samples at the end.
    """
    quiet_known_messages()
    if help_text := constructor_help(list(sys.argv[1:] if args is None else args)):
        print(help_text)
        raise SystemExit(0)
    import_every_family_and_datamodule()
    return MMLMCLI(
        MultimodalModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )
