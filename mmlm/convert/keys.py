"""Strict key checking for every weight load (encoders, language models, converters).

A load passes only when the state dict and the module agree on every key, except keys matched by
an explicit allow-list. Allow-list entries are ``fnmatch`` patterns (``"pooler.*"``, ``"head.fc.*"``,
or an exact key). A failure raises a ``RuntimeError`` naming every offending key and the source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
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
