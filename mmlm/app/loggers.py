"""What every ``mmlm fit|validate|test|predict`` run records with its loggers.

* :func:`default_loggers`: TensorBoard (the default) with a CSV file beside its event files, in one version folder
  (``<default_root_dir>/lightning_logs/version_N/``: ``events.out.tfevents.*``, ``metrics.csv``, ``config.yaml``).
* :func:`with_run_folder`: a TensorBoard or CSV logger first when the chosen loggers start with another kind (W&B,
  MLflow), so a run's files go to its own version folder.
* :func:`logger_problem`: a logger chosen in the config whose package is not installed, named with the package
  and the ``pip install`` that adds it (W&B and MLflow are the extras ``mmlm[wandb]`` and ``mmlm[mlflow]``).
* :class:`LoggedConfig`: LightningCLI's config saving, which also gives every logger the resolved config and the
  versions of the packages that ran it (:func:`package_versions`).
* :func:`log_text`: a block of text (the config as YAML, the data report) where the logger has a place for it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

#: Logger class name → (module it imports, what to ``pip install`` for it).
LOGGER_PACKAGES: dict[str, tuple[str, str]] = {
    "WandbLogger": ("wandb", "'mmlm[wandb]'"),
    "MLFlowLogger": ("mlflow", "'mmlm[mlflow]'"),
    "TensorBoardLogger": ("tensorboard", "tensorboard"),
    "CometLogger": ("comet_ml", "comet-ml"),
    "NeptuneLogger": ("neptune", "neptune"),
    "LitLogger": ("litlogger", "litlogger"),
}
#: Distributions whose versions every run records (``versions/<name>``).
RECORDED_PACKAGES = ("mmlm", "torch", "pytorch-lightning", "transformers", "timm", "open_clip_torch", "webdataset",
                     "torchmetrics", "jsonargparse")


def default_loggers(save_dir: str) -> list[Logger]:
    """TensorBoard and, beside its event files (same version folder), a CSV logger writing ``metrics.csv``.

    TensorBoard comes first, so ``trainer.log_dir`` (checkpoints' neighbours, predictions, data reports) is its
    folder."""
    tensorboard = TensorBoardLogger(save_dir=save_dir)
    csv = CSVLogger(save_dir=save_dir, name=tensorboard.name, version=tensorboard.version)
    _ = csv.experiment  # made while the new version folder is empty (made later, CSV warns that it is not)
    return [tensorboard, csv]


def with_run_folder(loggers: list[Logger], save_dir: str) -> list[Logger]:
    """``loggers`` with a TensorBoard or CSV logger first: the first such logger of the list moved to the front, or,
    when there is none (W&B, MLflow, … only), a new CSV logger put there.

    Lightning's ``trainer.log_dir`` is the first logger's folder, where mmlm writes ``config.yaml``, the data report,
    ``predictions/`` and ``report.html``. For W&B and MLflow that folder is their ``save_dir`` (``.`` for W&B: a
    config named ``config.yaml`` in the working folder would be overwritten; ``None`` for a remote MLflow server);
    a TensorBoard or CSV logger gives every run its own ``<save_dir>/lightning_logs/version_N`` folder and the
    ``metrics.csv`` that ``mmlm report`` draws its curves from. ``trainer.logger`` is then that logger: reach W&B
    or MLflow through ``trainer.loggers``."""
    own = next((logger for logger in loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))), None)
    if not loggers or own is loggers[0]:
        return loggers
    if own is None:
        own = CSVLogger(save_dir=save_dir)
        _ = own.experiment
    return [own, *(logger for logger in loggers if logger is not own)]


def logger_class_names(logger: Any) -> list[str]:
    """The class names of a parsed ``trainer.logger`` value (one ``class_path`` entry or a list of them)."""
    entries = logger if isinstance(logger, list) else [logger]
    paths = [entry.get("class_path") if hasattr(entry, "get") else None for entry in entries]
    return [str(path).rsplit(".", 1)[-1] for path in paths if path]


def logger_problem(logger: Any) -> str | None:
    """Why the parsed ``trainer.logger`` cannot be built here: the package of a chosen logger is not installed
    (named, with the ``pip install`` that adds it); else ``None``."""
    for name in logger_class_names(logger):
        module, install = LOGGER_PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            return f"trainer.logger={name} needs the {module!r} package, which is not installed: pip install {install}"
    return None


def installed_versions(names: Iterable[str], missing: str = "-") -> dict[str, str]:
    """The installed version of each distribution in ``names`` (``missing`` for one not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = missing
    return versions


def package_versions() -> dict[str, str]:
    """Python, CUDA and the versions of :data:`RECORDED_PACKAGES` (``"-"`` for one not installed)."""
    return {"python": platform.python_version(), "cuda": str(torch.version.cuda or "-"),
            **installed_versions(RECORDED_PACKAGES)}


def log_text(logger: Logger, tag: str, text: str) -> None:
    """Record ``text`` under ``tag`` where the logger keeps text: TensorBoard's Text tab, an MLflow artifact
    ``<tag>.txt``, a W&B file of the run; other loggers (CSV) keep the files mmlm writes into the log folder."""
    experiment = logger.experiment
    if hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
        experiment.add_text(tag, "```\n" + text + "\n```")
    elif hasattr(experiment, "log_text") and hasattr(logger, "run_id"):  # MLflow's client
        experiment.log_text(logger.run_id, text, f"{tag.replace('/', '_')}.txt")
    elif hasattr(experiment, "summary") and hasattr(experiment, "config"):  # a W&B run
        experiment.summary[tag] = text


class LoggedConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the log folder, and for every logger the resolved config and the package
    versions as hyperparameters (``config/<key>``, ``versions/<package>``; TensorBoard's HParams, W&B's config,
    MLflow's params, CSV's ``hparams.yaml``) plus the config as text (:func:`log_text`)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        plain = {key: value for key, value in yaml.safe_load(text).items() if key not in ("config", "subcommand")}
        params = {"config": plain, "versions": package_versions()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            log_text(logger, "config", text)
