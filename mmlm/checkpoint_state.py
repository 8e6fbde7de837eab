"""What mmlm puts into a checkpoint besides the weights: plain hyperparameters, how the module was built, and
fingerprints of frozen parts that are left out because they can be re-read from their source.

* **Plain hyperparameters.** Lightning stores ``save_hyperparameters`` values as they are; a dataclass (e.g.
  :class:`~mmlm.language.base.GenerationConfig`) or a tuple then needs unpickling (``torch.load(weights_only=True)``,
  which LightningCLI uses for ``--ckpt_path``, refuses it) and writes ``!!python/object`` tags into ``hparams.yaml``.
  :func:`plain` turns dataclasses into dicts and tuples into lists and drops what has no plain form (modules,
  classes, callables): a module built by LightningCLI keeps its parts' ``class_path``/``init_args`` dicts, so
  ``load_from_checkpoint`` can rebuild it; one built in Python with part objects cannot record them.
* **Builders.** A module made by a classmethod (``Blip2.from_hf``, ``Donut.from_hf``) records the classmethod's
  arguments as its hyperparameters and the builder's name under :data:`BUILDER_KEY`, so ``load_from_checkpoint``
  calls the builder, and LightningCLI's ``--ckpt_path`` merge gives the builder its own arguments back.
* **Frozen parts from a source.** A frozen part whose weights come from a hub id, a directory or a weights file
  (``Freezable.source``) can be left out of checkpoints (:func:`leave_out_frozen`): the checkpoint keeps each tensor's
  shape, dtype and a fingerprint instead, and loading re-reads the part from its source (the module is built from
  its config first) and refuses it when a fingerprint differs (:func:`restore_frozen`). Optimizer states only hold
  trainable parameters, so resuming stays exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmlm.freezing import Freezable

#: Checkpoint key: the name of the classmethod that built the module (``"from_hf"``), when not ``__init__``.
BUILDER_KEY = "mmlm_builder"
#: Checkpoint key: ``{"sources": {prefix: source}, "tensors": {key: [shape, dtype, fingerprint]}}``.
FROZEN_KEY = "mmlm_frozen_from_source"
#: Elements of a tensor hashed into its fingerprint (evenly strided).
FINGERPRINT_SAMPLES = 65536
PLAIN_SCALARS = (str, int, float, bool, type(None))
FROZEN_WEIGHTS = ("auto", "save", "source")


class _Drop:
    """Marker of a value without a plain form."""


DROP = _Drop()


def plain(value: Any) -> Any:
    """``value`` in YAML/``weights_only``-safe types: dataclasses → dicts, tuples → lists, mappings → dicts;
    :data:`DROP` for anything else that is not a plain scalar (modules, classes, callables, tensors)."""
    if isinstance(value, PLAIN_SCALARS):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        items = {str(k): plain(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not DROP}
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return DROP if any(v is DROP for v in items) else items
    return DROP


def plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The plain part of a hyperparameter mapping (see :func:`plain`)."""
    return plain(dict(hparams))


def fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of ``tensor``'s values: up to :data:`FINGERPRINT_SAMPLES` evenly strided elements, as float64
    (cheap on billions of parameters, and any realistic change of the weights changes it)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = flat[::step][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float64)
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:24]


def describe(tensor: torch.Tensor) -> list[Any]:
    """``[shape, dtype, fingerprint]`` of a tensor, as stored in a checkpoint."""
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."), fingerprint(tensor)]


def frozen_sources(module: nn.Module) -> dict[str, str]:
    """``{prefix: source}`` of the outermost frozen :class:`~mmlm.freezing.Freezable` parts with a ``source``."""
    found: dict[str, str] = {}
    for name, part in module.named_modules():
        if name and isinstance(part, Freezable) and part.frozen and part.source:
            if not any(name.startswith(prefix + ".") for prefix in found):
                found[name] = part.source
    return found


def _keys_under(state: Mapping[str, Any], prefixes: list[str]) -> list[str]:
    return [key for key in state if any(key.startswith(prefix + ".") for prefix in prefixes)]


def leave_out_frozen(module: nn.Module, checkpoint: dict[str, Any], policy: str) -> None:
    """Remove the frozen-from-source tensors from ``checkpoint["state_dict"]`` and record their descriptions.
    Trainable parameters inside such a part (the LoRA adapters of a frozen LM) are kept.

    ``policy``: ``"save"`` keeps everything; ``"source"`` leaves every such part out; ``"auto"`` leaves them out
    when they hold more parameters than the trainable parts (a frozen LLM beside a small adapter).
    """
    if policy not in FROZEN_WEIGHTS:
        raise ValueError(f"frozen_weights={policy!r} is not one of {FROZEN_WEIGHTS}")
    state = checkpoint.get("state_dict")
    sources = frozen_sources(module)
    if policy == "save" or not sources or not isinstance(state, dict):
        return
    training = {name for name, param in module.named_parameters() if param.requires_grad}  # adapters (LoRA)
    keys = [key for key in _keys_under(state, list(sources)) if key not in training]
    if policy == "auto":
        frozen = sum(state[k].numel() for k in keys if isinstance(state[k], torch.Tensor))
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if frozen <= trainable:
            return
    checkpoint[FROZEN_KEY] = {"sources": sources, "tensors": {k: describe(state[k]) for k in keys}}
    for key in keys:
        del state[key]


def restore_frozen(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put the module's own frozen tensors (re-read from their sources when it was built) back into
    ``checkpoint["state_dict"]`` after checking them against the recorded descriptions.

    Raises:
        ValueError: a frozen tensor is missing, or its shape, dtype or values differ from those the checkpoint was
            trained with (naming the tensor, its part's source and what differs).
    """
    recorded = checkpoint.get(FROZEN_KEY)
    if not recorded:
        return
    state = module.state_dict()
    sources = recorded["sources"]
    for key, (shape, dtype, digest) in recorded["tensors"].items():
        source = next((s for p, s in sources.items() if key.startswith(p + ".")), "?")
        if key not in state:
            raise ValueError(f"the checkpoint left out frozen weight {key!r} (source {source}) but this module has no "
                             "such weight: build it with the configuration the checkpoint was trained with")
        now = describe(state[key])
        if now != [shape, dtype, digest]:
            what = "shape" if now[0] != shape else "dtype" if now[1] != dtype else "values"
            raise ValueError(f"frozen weight {key!r} from {source} differs from the one this checkpoint was trained "
                             f"with ({what}: checkpoint {[shape, dtype, digest]}, now {now}); its source changed. Load "
                             "the original source, or save checkpoints with frozen_weights='save'")
        checkpoint["state_dict"][key] = state[key]
