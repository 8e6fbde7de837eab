"""LoRA adapters on a language model through ``peft``: settings, injection, merging and peft adapter files.

LoRA (Hu et al. 2021) adds ``x A^T B^T * alpha / rank`` beside chosen linear layers: ``A [r, in]`` and ``B [out, r]``
train, the base weight stays frozen; ``B`` starts at zero, so an adapted model starts equal to its base. QLoRA
(Dettmers et al. 2023) is the same on a 4-bit base (the LM adapter's ``quantization: 4bit``).

``peft.inject_adapter_in_model`` replaces each target layer in place by a peft ``LoraLayer`` holding the base layer,
so any ``nn.Module`` works — transformers LMs and the built-in Sub-LN decoder alike. Parameter names gain
``base_layer.`` (the frozen weight) and ``lora_A.default.`` / ``lora_B.default.`` (the adapter). Freezing
(:func:`mmlm.freezing.freeze_`) leaves the adapters trainable; lean checkpoints keep them and leave out the base
(:mod:`mmlm.checkpoint_state`). Shape legend: r rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

#: peft's name of the one adapter mmlm injects.
ADAPTER_NAME = "default"
#: Files of a peft adapter directory (``PeftModel.from_pretrained(base, directory)`` reads them).
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

#: The q, k, v and output projections of self- (and cross-) attention, per transformers ``model_type``. Names match
#: a module whose qualified name ends with ``.name`` (peft's rule), so ``attn.c_proj`` spares GPT-2's ``mlp.c_proj``.
ATTENTION_PROJECTIONS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "attn.c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "mbart": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    "gpt_neox": ["query_key_value", "attention.dense"],
}


@dataclass(frozen=True)
class LoRA:
    """LoRA settings of a language model adapter (``lora:`` in YAML).

    Attributes:
        rank: r, the inner width of ``A`` and ``B``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter's input (training only; the frozen base keeps its eval mode).
        target_modules: names of the linear layers to adapt (a layer matches when its qualified name is the name or
            ends with ``.name``); ``None``: the LM's attention q/k/v/output projections
            (:data:`ATTENTION_PROJECTIONS`, the Sub-LN decoder's own, else peft's defaults for the model type).

    Raises:
        ValueError: a setting outside its range, naming it.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA: rank={self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"LoRA: alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA: dropout={self.dropout} must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("LoRA: target_modules=[] adapts nothing; give layer names or null for the defaults")


def default_targets(model_type: str) -> list[str]:
    """The attention projections of a transformers ``model_type`` (:data:`ATTENTION_PROJECTIONS`, else peft's
    ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``).

    Raises:
        ValueError: neither knows the model type (set ``target_modules``).
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in ATTENTION_PROJECTIONS:
        return list(ATTENTION_PROJECTIONS[model_type])
    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise ValueError(f"LoRA: no default target modules for model_type {model_type!r}; set lora.target_modules to "
                     "the names of its attention projections (e.g. [q_proj, v_proj])")


def matches(name: str, targets: list[str]) -> bool:
    """Whether the module called ``name`` is one of ``targets`` (peft's rule: equal, or ending in ``.target``)."""
    return any(name == target or name.endswith("." + target) for target in targets)


def peft_config(lora: LoRA, targets: list[str], fan_in_fan_out: bool = False, base: str | None = None) -> Any:
    """The ``peft.LoraConfig`` of ``lora`` on ``targets`` (``fan_in_fan_out``: GPT-2's ``Conv1D`` weights);
    ``base`` is recorded as ``base_model_name_or_path``."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets),
                      fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base)


def add_lora(module: nn.Module, lora: LoRA, targets: list[str]) -> None:
    """Put LoRA layers (peft) in place of ``module``'s layers named in ``targets``; the adapters of a half-precision
    base are kept in float32 (as ``peft.get_peft_model`` does).

    Raises:
        ValueError: no layer matches ``targets`` (peft's message names them).
    """
    from peft import inject_adapter_in_model
    from peft.functional import cast_adapter_dtype

    conv1d = any(type(m).__name__ == "Conv1D" for name, m in module.named_modules() if matches(name, targets))
    inject_adapter_in_model(peft_config(lora, targets, fan_in_fan_out=conv1d), module, ADAPTER_NAME)
    cast_adapter_dtype(module, ADAPTER_NAME, autocast_adapter_dtype=True)


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside ``module`` (each holds its ``base_layer`` and the adapter)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def lora_modules(module: nn.Module) -> list[nn.Module]:
    """The trainable parts of every LoRA layer in ``module``: ``lora_A``, ``lora_B`` (and peft's other adapter
    tensors) and ``lora_dropout``, each a ``ModuleDict`` keyed by adapter name."""
    names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")
    return [getattr(layer, n) for layer in lora_layers(module) for n in names if isinstance(getattr(layer, n, None),
                                                                                          nn.Module)]


def merge_lora_(module: nn.Module) -> nn.Module:
    """Add each LoRA update into its base weight (peft's ``merge``) and put the plain base layer back in place (in
    place; returns ``module``): the parameter names and the forward are the base model's again."""
    named = {id(m): name for name, m in module.named_modules()}
    for layer in lora_layers(module):
        layer.merge(safe_merge=True)
        parent_name, _, child = named[id(layer)].rpartition(".")
        setattr(module.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    return module


def adapter_state(module: nn.Module) -> dict[str, Any]:
    """The adapter's tensors of ``module`` under the keys of a saved ``PeftModel`` (``base_model.model.…``, no
    adapter name), detached and contiguous."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}


def save_adapter(module: nn.Module, directory: str | Path, base: str | None, task_type: str | None = None) -> Path:
    """Write ``module``'s adapter as a peft adapter directory (``adapter_config.json`` with ``base`` as
    ``base_model_name_or_path``, ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base_model, directory)``
    loads it onto the base model. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = module.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path, config.task_type = base, task_type
    config.save_pretrained(str(directory))
    save_file(adapter_state(module), str(directory / ADAPTER_WEIGHTS))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a peft adapter directory, as a dict."""
    return json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
