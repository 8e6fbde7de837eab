"""Collectives that losses, metrics and evaluators share: rank/world lookup, an all-gather that keeps gradients,
padded gathers and object gathers.

Everything here is the identity (world of one) when no process group is initialised, so the same
loss code runs in a single CPU process, under DDP and in tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's value of ``n`` (e.g. its local batch size), in rank order; ``[n]`` without a group."""
    _, world = rank_and_world()
    if world == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return [int(p.item()) for p in parts]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gathered gradients and returns the local slice.

    Every rank computes a loss from the gathered tensor, so the gradient of the sum of all ranks'
    losses with respect to this rank's rows is the sum, over ranks, of their gradients for those
    rows (an all-reduce). DDP then averages parameter gradients, which makes the update equal to
    that of one process over the concatenated batch with the mean of the per-rank losses
    (the behaviour of open_clip's ``gather_features(gather_with_grad=True)`` and LAVIS's ``GatherLayer``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        padded = x.contiguous()
        longest = max(sizes)
        if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim each part
            padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x [B_r, ...]`` of every rank along dim 0 → ``[sum_r B_r, ...]``, in rank order.

    Gradients flow back to this rank's slice (summed over the losses of all ranks, see
    :class:`_GatherWithGrad`); the other ranks' slices reach their own ranks the same way. Ranks
    may hold different ``B_r`` (one extra small all-gather of the sizes). Identity without an
    initialised process group. Every rank must call it (and backpropagate through it) in the same order.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, gather_sizes(x.shape[0], x.device), rank)


def gather_padded(x: Tensor, pad: int | float, width: int) -> Tensor:
    """``x [B, T]`` right-padded to ``width`` and gathered over ranks → ``[B_all, width]`` (identity without DDP)."""
    return gather_with_grad(F.pad(x, (0, width - x.shape[1]), value=pad))


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a picklable Python list across ranks, in rank order (identity without a process group).

    Every rank must call it, in the same order as the other collectives."""
    _, world = rank_and_world()
    if world == 1:
        return items
    out: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on some rank (one all-reduce; ``flag`` itself without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
