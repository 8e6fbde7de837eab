"""Loading weights, shared by encoders, language models and converters.

* Local path or hub id: a missing local directory is named instead of sent to the hub (:func:`require_local`).
* Strict key checks for every weight load: a load passes only when the state dict and the module agree on every
  key, except keys matched by an explicit allow-list of ``fnmatch`` patterns (``"pooler.*"``, ``"head.fc.*"`` or an
  exact key); a failure raises a ``RuntimeError`` naming every offending key and the source.
* Transformers models from a directory, a hub id or a config dict, loaded strictly (:func:`load_hf_model`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

#: Keys of a transformers config's ``to_dict`` that are not architecture (``AutoConfig.for_model`` takes the rest).
CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "model_type", "dtype", "torch_dtype")


def looks_local(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` can only be a local path, not a hub id (``name`` or ``org/name``).

    True for absolute paths, paths starting with ``.``, paths of more than two parts
    (``data/shapes/tokenizer``) and paths whose first part exists here (``runs/export``).
    """
    text = str(name_or_path)
    parts = Path(text).parts
    return Path(text).is_absolute() or text.startswith(".") or len(parts) > 2 or (
        len(parts) > 1 and Path(parts[0]).exists())


def config_kwargs(config: Any, with_type: bool = True) -> dict[str, Any]:
    """A transformers config as ``{"model_type": …, **architecture}`` (``with_type=False``: without the type): what
    ``AutoConfig.for_model`` rebuilds it from (a part's ``config`` argument, without reading any weights)."""
    kwargs = {k: v for k, v in config.to_dict().items() if k not in CONFIG_NOISE}
    return {"model_type": config.model_type, **kwargs} if with_type else kwargs


def require_local(name_or_path: str | Path, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and the path when a local-looking path does not exist."""
    if looks_local(name_or_path) and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} does not exist (a local path: not a hub id). "
            "Create it first (e.g. `mmlm data synth-shapes` for the shapes tokenizer, the text-LM stage for its "
            "export) or point the config at another directory.")


def _disallowed(keys: Iterable[str], allow: Sequence[str]) -> list[str]:
    """The keys not matched by any pattern in ``allow``, sorted."""
    return sorted(k for k in keys if not any(fnmatchcase(k, pattern) for pattern in allow))


def check_keys(missing: Iterable[str], unexpected: Iterable[str], source: str,
               allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> None:
    """Raise like torch's strict load, naming every missing and unexpected key outside the allow-lists.

    Args:
        missing: keys the module has but the state dict lacks.
        unexpected: keys the state dict has but the module lacks.
        source: what was loaded (a path or hub id), for the message.
        allow_missing: ``fnmatch`` patterns of missing keys that are fine.
        allow_unexpected: ``fnmatch`` patterns of unexpected keys that are fine (ignored on load).

    Raises:
        RuntimeError: ``"loading {source}: missing keys [...], unexpected keys [...]"``.
    """
    missing, unexpected = _disallowed(missing, allow_missing), _disallowed(unexpected, allow_unexpected)
    if missing or unexpected:
        raise RuntimeError(f"loading {source}: missing keys {missing}, unexpected keys {unexpected}")


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                           allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = ()) -> None:
    """``module.load_state_dict(state_dict)`` that tolerates only allow-listed key differences.

    Shape mismatches raise as in torch. See :func:`check_keys` for the arguments and the error.
    """
    result = module.load_state_dict(state_dict, strict=False)
    check_keys(result.missing_keys, result.unexpected_keys, source, allow_missing, allow_unexpected)


def check_hf_loading_info(info: Mapping[str, Any], source: str, allow_missing: Sequence[str] = (),
                          allow_unexpected: Sequence[str] = ()) -> None:
    """Check the ``loading_info`` of transformers' ``from_pretrained(..., output_loading_info=True)``.

    Keys with mismatched shapes count as missing and are never allowed.
    """
    missing = _disallowed(info["missing_keys"], allow_missing) + [k for k, *_ in info["mismatched_keys"]]
    check_keys(missing, info["unexpected_keys"], source, allow_unexpected=allow_unexpected)


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def id_list(ids: int | list[int] | None) -> list[int]:
    """A special-token id field (``None``, an int or a list of ints) as a list."""
    if ids is None:
        return []
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


def check_special_ids(config: PretrainedConfig) -> None:
    """Raise when a special-token id of ``config`` falls outside its vocabulary.

    Catches e.g. GPT2Config's default bos/eos 50256 kept with a small ``vocab_size``; such an id
    would make generation never stop and padding index past the embedding table.

    Raises:
        ValueError: naming the key, its value and ``vocab_size``.
    """
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    for key in SPECIAL_ID_KEYS:
        value = getattr(config, key, None)
        if any(not 0 <= i < vocab_size for i in id_list(value)):
            raise ValueError(
                f"{config.model_type} config: {key}={value} is outside the vocabulary (vocab_size={vocab_size}); "
                f"set {key!r} in the config dict (e.g. to your tokenizer's id)")


def build_hf_config(config: dict[str, Any]) -> PretrainedConfig:
    """``{"model_type": "gpt2", "n_layer": 2, …}`` → a transformers config (``AutoConfig.for_model``).

    Raises:
        ValueError: no ``model_type`` key, or a special-token id outside the vocabulary.
    """
    from transformers import AutoConfig

    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"config dict needs a 'model_type' key (e.g. 'gpt2', 't5'); got keys {sorted(config)}")
    hf_config = AutoConfig.for_model(model_type, **kwargs)
    check_special_ids(hf_config)
    return hf_config


def load_hf_model(auto_class: Any, name_or_path: str | None, config: dict[str, Any] | None,
                  dtype: torch.dtype | None) -> PreTrainedModel:
    """Load ``name_or_path`` (hub id or local dir) strictly, or build a randomly initialised model from ``config``.

    Raises:
        ValueError: neither or both of ``name_or_path`` and ``config`` are given.
        FileNotFoundError: ``name_or_path`` is a local path that does not exist.
        RuntimeError: the checkpoint misses weights the model has (or has extra or misshapen ones),
            naming the keys; transformers' own tied-weight and ignore lists apply first.
    """
    if (name_or_path is None) == (config is None):
        raise ValueError("give exactly one of name_or_path (hub id or local directory) and config "
                         f"(dict with 'model_type'); got name_or_path={name_or_path!r}, config={config!r}")
    dtype_kwargs = {} if dtype is None else {"dtype": dtype}
    if name_or_path is not None:
        require_local(name_or_path, "language model directory")
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **dtype_kwargs)
        check_hf_loading_info(info, name_or_path)
        return model
    return auto_class.from_config(build_hf_config(config), **dtype_kwargs)


def sub_state(state: Mapping[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of ``state`` under ``prefix``, with it stripped; ``None`` stays ``None``."""
    if state is None:
        return None
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
