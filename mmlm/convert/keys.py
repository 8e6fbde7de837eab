"""Strict key checking for every weight load (encoders, language models, converters).

A load passes only when the state dict and the module agree on every key, except keys matched by
an explicit allow-list. Allow-list entries are ``fnmatch`` patterns (``"pooler.*"``, ``"head.fc.*"``,
or an exact key). A failure raises a ``RuntimeError`` naming every offending key and the source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn


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


def split_by_prefix(state: Mapping[str, torch.Tensor], prefixes: Sequence[str], source: str,
                    routes: Mapping[str, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Full checkpoint → ``{prefix: {key without prefix: tensor}}`` for each of ``prefixes``.

    ``routes`` sends exact keys to a part unchanged (e.g. BLIP-2's ``query_tokens`` → ``"qformer."``). Any key
    under none of the prefixes raises, naming ``source``.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    stray = []
    for key, value in state.items():
        if routes and key in routes:
            parts[routes[key]][key] = value
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            stray.append(key)
        else:
            parts[prefix][key.removeprefix(prefix)] = value
    extra = f" and {', '.join(routes)}" if routes else ""
    check_keys([], stray, f"{source} (keys outside {tuple(prefixes)}{extra})")
    return parts


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{key: first key sharing its storage}`` for every state-dict entry that repeats a tensor (tied heads)."""
    first: dict[int, str] = {}
    aliases = {}
    for key, value in module.state_dict(keep_vars=True).items():
        ptr = id(value)  # tied parameters are one object (data_ptr is 0 for every meta tensor)
        if ptr in first:
            aliases[key] = first[ptr]
        else:
            first[ptr] = key
    return aliases


def load_part(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load ``state`` strictly into ``module``; a missing key is allowed only when it is tied to a loaded one.

    ``assign=True`` puts the given tensors in place (for a module built on the meta device)."""
    aliases = tied_aliases(module)
    state = dict(state)
    for key, target in aliases.items():  # fill a tied alias from whichever of the pair the file holds
        if key not in state and target in state:
            state[key] = state[target]
        elif target not in state and key in state:
            state[target] = state[key]
    result = module.load_state_dict(state, strict=False, assign=assign)
    check_keys(result.missing_keys, result.unexpected_keys, source)


def read_checkpoint(name_or_path: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Local directory (or hub id, downloaded when online) → ``(directory, full state dict)`` from its safetensors."""
    from safetensors.torch import load_file

    directory = Path(name_or_path)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                         "*.txt"]))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{name_or_path}: no *.safetensors files in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return directory, state
