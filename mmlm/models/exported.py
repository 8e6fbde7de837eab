"""Self-contained exported models: a directory any machine can load without the training run's files.

``mmlm export`` (and :func:`export_model`) writes, for a trained module:

* ``model.yaml``: ``class_path`` + ``init_args`` that rebuild the module's architecture without reading any weights —
  its training config with every part's source replaced by the part's :meth:`~mmlm.freezing.Freezable.offline_args`
  (a Hugging Face model by its own config, timm/open_clip without pretrained weights, preprocessing spelled out), the
  tokenizer pointing at ``tokenizer/``, other local files (answer lists, BERT directories…) copied into ``files/`` and
  arguments that only load weights (``init_from``, ``timm_init``) or write outputs (``export_dir``) cleared;
* ``model.safetensors``: every weight of the module (frozen parts included), loaded strictly;
* ``tokenizer/``: the tokenizer with every token the module added;
* ``adapters/<part>/``: for a language model with LoRA adapters, a peft adapter directory (``adapter_config.json``
  naming the base model the part was read from, ``adapter_model.safetensors``): the adapter alone, for
  ``PeftModel.from_pretrained(base, directory)`` (the module itself loads from ``model.safetensors``);
* ``mmlm_export.json``: the mmlm version, the family, the checkpoint and step it came from, the training config.

:meth:`MultimodalModule.from_pretrained` (``Family.from_pretrained(DIR)``) and ``mmlm validate|test|predict --model
DIR`` load it. BLIP-2 and Donut export to their Hugging Face formats instead (``to_hf``; ``mmlm_export.json`` beside
them), with LoRA adapters merged into the language model's weights first. Shape legend: none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from safetensors.torch import load_model, save_model

from mmlm.checkpointing import load_checkpoint_file
from mmlm.freezing import Freezable
from mmlm.hub import looks_local
from mmlm.language.base import LanguageModel
from mmlm.lora import save_adapter

MODEL_FILE, WEIGHTS_FILE, INFO_FILE, TOKENIZER_DIR, FILES_DIR, ADAPTERS_DIR = (
    "model.yaml", "model.safetensors", "mmlm_export.json", "tokenizer", "files", "adapters")
#: Init arguments that only load weights or name an output: an exported model needs neither.
WEIGHT_OR_OUTPUT_ARGS = ("init_from", "timm_init", "export_dir", "predictions_dir")


def mmlm_version() -> str:
    """The installed mmlm version (``"unknown"`` outside an installation)."""
    try:
        return version("mmlm")
    except PackageNotFoundError:
        return "unknown"


def family_path(cls: type) -> str:
    """``module.Class`` of a family class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def split_config(hparams: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(class_path, init_args)`` of a module's recorded config (LightningCLI's ``_class_path`` + arguments).

    Raises:
        ValueError: the module did not record its config (built in Python with part objects).
    """
    class_path = hparams.get("_class_path")
    if class_path is None:
        raise ValueError("the module does not record its config (it was built in Python, not from a config): export "
                         "needs a checkpoint of `mmlm fit`, or pass --config")
    return class_path, {k: v for k, v in hparams.items() if not k.startswith("_")}


def is_file_argument(value: str) -> bool:
    """Whether a string argument names an existing local file or folder (not a task name, a hub id…)."""
    return (looks_local(value) or "/" in value or Path(value).suffix != "") and Path(value).exists()


def copy_local(value: str, directory: Path, used: dict[str, str]) -> str:
    """Copy the local file or folder ``value`` into ``directory/files/`` (once); the copy's path relative to
    ``directory``."""
    if value not in used:
        target = directory / FILES_DIR / f"{len(used)}_{Path(value).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(value).is_dir() else shutil.copy2)(value, target)
        used[value] = str(target.relative_to(directory))
    return used[value]


def offline_init_args(model: torch.nn.Module, init_args: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The module's init arguments rewritten to read nothing outside ``directory`` (see the module docstring)."""
    out, copied = {}, {}
    for name, value in init_args.items():
        part = getattr(model, name, None)
        if name in WEIGHT_OR_OUTPUT_ARGS:
            value = None
        elif name == "tokenizer":
            value = TOKENIZER_DIR
        elif isinstance(part, Freezable) and isinstance(value, dict) and "class_path" in value:
            value = {**value, "init_args": {**value.get("init_args", {}), **part.offline_args()}}
        elif isinstance(value, str) and is_file_argument(value):
            value = copy_local(value, directory, copied)
        out[name] = value
    return out


def export_model(model: Any, directory: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a ``MultimodalModule`` built from a config) as a self-contained directory; returns it.

    Args:
        model: the trained module (its hyperparameters hold its config).
        directory: the output directory (created; refused when it already holds an export, nothing is overwritten).
        source: what to record about its origin (checkpoint path, global step).
    """
    directory = Path(directory)
    class_path, init_args = split_config(dict(model.hparams))
    with staging(directory) as stage:
        config = {"class_path": class_path, "init_args": offline_init_args(model, init_args, stage)}
        save_model(model, str(stage / WEIGHTS_FILE))  # tied weights stored once
        model.tokenizer.save_pretrained(str(stage / TOKENIZER_DIR))
        for name, part in lora_parts(model).items():
            save_adapter(part.lora_root(), stage / ADAPTERS_DIR / name, part.source, part.peft_task_type)
        write_info(model, stage, "mmlm", source)
        (stage / MODEL_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def lora_parts(model: torch.nn.Module) -> dict[str, LanguageModel]:
    """``{name: part}`` of the module's language models that have LoRA adapters."""
    return {name: part for name, part in model.named_modules()
            if isinstance(part, LanguageModel) and part.lora is not None}


def merge_adapters(model: torch.nn.Module) -> None:
    """Merge every language model's LoRA adapters into its base weights (in place), as transformers' formats hold
    plain weights."""
    for part in lora_parts(model).values():
        part.merge_lora()


@contextlib.contextmanager
def staging(directory: Path) -> Iterator[Path]:
    """A temporary folder beside ``directory`` that becomes ``directory`` when the block succeeds (removed when it
    fails), so an interrupted export leaves nothing half-written.

    Raises:
        FileExistsError: ``directory`` exists and is not empty (nothing is overwritten).
    """
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose another --out")
    stage = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if directory.exists():
        directory.rmdir()
    os.replace(stage, directory)


def write_info(model: Any, directory: Path, fmt: str, source: dict[str, Any] | None) -> None:
    """``mmlm_export.json``: version, family, format, origin and the training config."""
    info = {"mmlm_version": mmlm_version(), "family": family_path(type(model)), "format": fmt,
            "source": source or {}, "training_config": dict(model.hparams)}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))


def model_config(directory: str | Path) -> dict[str, Any]:
    """``model.yaml`` of an export with its relative paths made absolute (a ``class_path``/``init_args`` dict)."""
    directory = Path(directory).resolve()
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an exported mmlm model (no {MODEL_FILE}; export with mmlm export)")
    config = yaml.safe_load(path.read_text())
    args = config["init_args"]
    for name, value in args.items():
        if isinstance(value, str) and (value == TOKENIZER_DIR or value.startswith(FILES_DIR + "/")):
            args[name] = str(directory / value)
    return config


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load an export's ``model.safetensors`` into ``model`` strictly (missing or unexpected keys raise)."""
    missing, unexpected = load_model(model, str(Path(directory) / WEIGHTS_FILE), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"{directory}: weights do not fit the model (missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]})")


def load_exported(directory: str | Path) -> Any:
    """Rebuild an exported module from ``model.yaml`` (nothing read outside ``directory``) and load its weights."""
    from pytorch_lightning.cli import instantiate_module

    from mmlm.models.base import MultimodalModule

    config = model_config(directory)
    recorded = {"_class_path": config["class_path"], **config["init_args"]}
    model = instantiate_module(MultimodalModule, recorded)
    model._set_plain_hparams(recorded)  # the module records the config it was built from, as one built by the CLI
    load_weights(model, directory)
    return model.eval()


class LoadExportedWeights(pl.Callback):
    """Load an export's weights into the module at ``setup`` (``mmlm validate|test|predict --model DIR``).

    Args:
        directory: the exported model's directory.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        load_weights(pl_module, self.directory)
        info = Path(self.directory) / INFO_FILE
        if info.is_file():
            pl_module.weights_step = int(json.loads(info.read_text()).get("source", {}).get("global_step", 0))


def build_from_config(config_file: str | Path) -> Any:
    """The module of a YAML config's ``model`` section (``class_path`` + ``init_args``), built without data or
    trainer."""
    from pytorch_lightning.cli import instantiate_module

    from mmlm.models.base import MultimodalModule

    section = yaml.safe_load(Path(config_file).read_text()).get("model")
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(f"{config_file}: no model section with a class_path")
    recorded = {"_class_path": section["class_path"], **section.get("init_args", {})}
    model = instantiate_module(MultimodalModule, recorded)
    model._set_plain_hparams(recorded)
    return model


def checkpoint_model_config(checkpoint_path: str | Path) -> dict[str, Any]:
    """The ``model`` section (``class_path`` + ``init_args``) a checkpoint of ``mmlm fit`` records: the module's
    class, or the classmethod that built it (``…Blip2.from_hf``) with that builder's arguments.

    Raises:
        CheckpointError: the file cannot be read (:func:`mmlm.checkpointing.load_checkpoint_file`).
        ValueError: the checkpoint records no config (a module built in Python with part objects).
    """
    from mmlm.checkpoint_state import BUILDER_KEY

    checkpoint = load_checkpoint_file(checkpoint_path)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    class_path, init_args = split_config(hparams)
    if BUILDER_KEY not in checkpoint and "." not in class_path:
        raise ValueError(f"records class {class_path!r}, which is not importable")
    return {"class_path": class_path, "init_args": init_args}


def load_checkpoint(checkpoint_path: str | Path, config_file: str | Path | None = None) -> Any:
    """A trained module from a Lightning checkpoint: rebuilt from the checkpoint's recorded config (or from
    ``config_file``'s model section) with its weights loaded (``weights_only`` loading, strict)."""
    from mmlm.checkpoint_state import BUILDER_KEY
    from mmlm.models.base import MultimodalModule

    checkpoint_path = Path(checkpoint_path)
    if config_file is None:
        checkpoint = load_checkpoint_file(checkpoint_path)
        hparams = checkpoint.get("hyper_parameters", {})
        class_path = split_config(hparams)[0] if BUILDER_KEY not in checkpoint else hparams["_class_path"]
        owner = class_path.rsplit(".", 1)[0] if BUILDER_KEY in checkpoint else class_path
        module, _, name = owner.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        if not (isinstance(cls, type) and issubclass(cls, MultimodalModule)):
            raise ValueError(f"{checkpoint_path} records {class_path!r}, not an mmlm model")
        return cls.load_from_checkpoint(str(checkpoint_path)).eval()
    model = build_from_config(config_file)
    checkpoint = load_checkpoint_file(checkpoint_path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


def export(checkpoint_path: str | Path, out: str | Path, config_file: str | Path | None = None,
           fmt: str = "auto") -> dict[str, Any]:
    """``mmlm export``: the checkpoint's module written to ``out`` as Hugging Face files (``fmt="hf"``: BLIP-2 and
    Donut) or a self-contained mmlm directory (``"mmlm"``); ``"auto"``: Hugging Face where the family has it and
    the model's parts fit it (``exports_to_hf``: not a Donut with a timm CNN encoder).

    Returns:
        A summary: ``out``, ``format``, ``family``, ``global_step``.
    """
    if fmt not in ("auto", "hf", "mmlm"):
        raise ValueError(f"--format {fmt!r} is not one of auto, hf, mmlm")
    model = load_checkpoint(checkpoint_path, config_file)
    step = int(load_checkpoint_file(checkpoint_path).get("global_step", 0))
    source = {"checkpoint": str(Path(checkpoint_path).resolve()), "global_step": step}
    use_hf = fmt == "hf" or (fmt == "auto" and getattr(model, "exports_to_hf", hasattr(model, "to_hf")))
    out = Path(out)
    if use_hf:
        if not hasattr(model, "to_hf"):
            raise ValueError(f"{type(model).__name__} has no Hugging Face format; use --format mmlm")
        merge_adapters(model)
        with staging(out) as stage:
            model.to_hf(stage)
            write_info(model, stage, "hf", source)
    else:
        export_model(model, out, source)
    return {"out": str(out), "format": "hf" if use_hf else "mmlm", "family": family_path(type(model)),
            "global_step": step}
