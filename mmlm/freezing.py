"""Freezing and per-module dtype, shared by encoders, connectors and language models."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"float16"``/… (or a ``torch.dtype``) to a ``torch.dtype``; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def freeze_(module: nn.Module) -> nn.Module:
    """Turn off gradients for every base parameter and put the module in eval mode (in place).

    A :class:`Freezable` part is marked frozen, so it also stays in eval mode through ``fit``. Its adapters
    (:meth:`Freezable.adapters`, e.g. LoRA matrices) stay trainable and follow the trainer's train/eval mode: a frozen
    base with adapters is trained through them (LoRA, QLoRA).
    """
    for param in module.parameters():
        param.requires_grad_(False)
    for adapter in adapter_modules(module):
        adapter.requires_grad_(True)
    if isinstance(module, Freezable):
        module.frozen = True
    return module.eval()


def adapter_modules(module: nn.Module) -> list[nn.Module]:
    """The adapters (:meth:`Freezable.adapters`) of every :class:`Freezable` part inside ``module`` (itself too)."""
    return [adapter for part in module.modules() if isinstance(part, Freezable) for adapter in part.adapters()]


class Freezable(nn.Module):
    """Base for parts that may be frozen: a frozen part stays in eval mode through ``fit``.

    Subclasses call ``self.setup_freezing(freeze, dtype)`` at the end of ``__init__`` and set ``source`` when their
    weights are read from a hub id, a directory or a weights file (a frozen part with a source can be left out of
    checkpoints and re-read on load: :mod:`mmlm.checkpoint_state`).

    Attributes:
        frozen: no gradients, eval mode kept.
        source: where the weights were read from; ``None`` for a randomly initialised part.
    """

    frozen: bool = False
    source: str | None = None

    def offline_args(self) -> dict[str, Any]:
        """Init arguments that rebuild this part's architecture without reading any weights (an exported model's
        weights come from its own file): overrides of the arguments it was built with; ``{}`` when those already
        read nothing."""
        return {}

    def adapters(self) -> list[nn.Module]:
        """Submodules that stay trainable when the part is frozen and follow train/eval mode (LoRA's matrices and
        dropout); ``[]`` for a part without adapters."""
        return []

    def setup_freezing(self, freeze: bool, dtype: str | torch.dtype | None = None) -> None:
        """Freeze (no grads, eval mode kept) and/or cast to ``dtype``."""
        self.frozen = freeze
        torch_dtype = parse_dtype(dtype)
        if torch_dtype is not None:
            self.to(torch_dtype)
        if freeze:
            freeze_(self)

    def train(self, mode: bool = True) -> Freezable:
        """Like ``nn.Module.train`` but a frozen part always stays in eval mode; its adapters follow ``mode``."""
        super().train(mode and not self.frozen)
        for adapter in self.adapters():
            adapter.train(mode)
        return self
