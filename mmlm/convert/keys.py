"""Key maps for the converters: split a full checkpoint by part prefix, load a part with tied aliases, read a
safetensors checkpoint directory. The strict key checks themselves are core (:mod:`mmlm.hub`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from mmlm.hub import check_keys


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


def empty_weights() -> AbstractContextManager[None]:
    """Inside, modules are built with their parameters on the meta device (no memory, no random init) and their
    buffers real (accelerate's ``init_empty_weights(include_buffers=False)``); fill them with :func:`assign_part`."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def assign_part(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """:func:`load_part` into a module built under :func:`empty_weights`: the checkpoint's tensors become its
    parameters (no copy), tied weights are tied again (a transformers model's ``tie_weights``; the empty build
    re-registers each parameter, which unties them), and each tensor is cast to the dtype the module gave it (its
    ``dtype`` argument, else float32), not the file's."""
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    wanted = {name: tensor.dtype for name, tensor in module.state_dict(keep_vars=True).items()}
    load_part(module, state, source, assign=True)
    if callable(tie):
        tie()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.dtype != wanted[name]:
            tensor.data = tensor.data.to(wanted[name])


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
