"""Helpers every vision encoder shares: input sizes, the frozen ``no_grad`` switch, feature-map
flattening and the output-shape probe.

Shape legend: B batch, N image tokens, D width, C channels, h/w feature-map height/width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmlm.encoders.base import VisionEncoder


def as_image_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` → ``(224, 224)``; ``(3, H, W)`` or ``(H, W)`` → ``(H, W)``."""
    if isinstance(size, int):
        return (size, size)
    return (int(size[-2]), int(size[-1]))


def map_to_tokens(x: torch.Tensor, fmt: str = "NCHW") -> torch.Tensor:
    """A feature map ``[B, C, h, w]`` (or ``[B, h, w, C]`` when ``fmt="NHWC"``) → ``[B, h*w, C]``.

    Token tensors ``[B, N, D]`` pass through unchanged.
    """
    if x.ndim == 3:
        return x
    if fmt == "NHWC":
        return x.flatten(1, 2)
    return x.flatten(2).transpose(1, 2)


def sincos_2d(height: int, width: int, dim: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos positions of an ``height × width`` grid, row-major as :func:`map_to_tokens` flattens it:
    ``[height·width, dim]``; the first half of the channels encode the row, the second half the column, each as
    ``sin`` then ``cos`` of the index times ``10000^(-i / (dim/4))``, ``i < dim/4`` (the frequencies of MAE's 2D
    sin-cos table; MAE puts the column's half first, so the tables are not interchangeable).

    Raises:
        ValueError: ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows = torch.arange(height, dtype=torch.float64, device=device).repeat_interleave(width)[:, None] * omega
    cols = torch.arange(width, dtype=torch.float64, device=device).repeat(height)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).to(dtype)


def grad_context(frozen: bool) -> contextlib.AbstractContextManager:
    """``torch.no_grad()`` for a frozen encoder, a no-op otherwise."""
    return torch.no_grad() if frozen else contextlib.nullcontext()


def probe_output_shape(encoder: VisionEncoder, size: tuple[int, int]) -> tuple[int, int]:
    """``(N, D)`` of ``encoder``'s tokens for one ``size`` image (eval mode, no grad).

    The probe runs on fake tensors (shapes only, no compute), so a large encoder at a large input
    size (DonutSwin at 2560×1920) costs nothing on CPU; a model with an op fake tensors do not
    support falls back to one real forward. An encoder built with its parameters on the meta device
    (:func:`mmlm.convert.keys.empty_weights`) is probed with a meta input.
    """
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))  # meta: built empty, weights to come
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            shape = encoder(torch.zeros(1, 3, *size, device=device)).shape
    except Exception:  # any fake-tensor gap: measure with a real (or meta: shapes only) forward instead
        with torch.no_grad():
            shape = encoder(torch.zeros(1, 3, *size, device=device)).shape
    encoder.train(was_training)
    return shape[1], shape[2]
