"""LM head + loss on the target positions only (mmlm's ``causal_head_loss``) vs full logits (``causal_lm_loss``).

A short-answer label pattern: batch 8 rows of 48 tokens (32 query tokens and a prompt), right-padded to different
lengths, with 3 answer tokens labelled per row; a real head (50,257 × 2,048, GPT-2's vocabulary at a 1B-class
width; toy scale: 1,000 × 64), frozen as in BLIP-2/Frozen fine-tuning, the gradient flowing to the hidden states.
A step = the head, the float32 cross-entropy and the backward pass to the hidden states. Reference: the full
logits ``head(hidden) [B, T, V]`` and ``causal_lm_loss``. Peak memory: the most bytes allocated at once during a
step beyond its inputs (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the torch profiler's net allocation of
each op, summed in time order). Both sides give the same loss (checked).
"""

from __future__ import annotations

from typing import Any

import torch
from common import Scale, alternate, autocast, device, median, peak_bytes, row, timed
from torch import nn

from mmlm.losses import IGNORE_INDEX, causal_head_loss, causal_lm_loss

ROWS, LENGTH, ANSWER = 8, 48, 3


def sizes(scale: Scale) -> tuple[int, int]:
    """``(V, D)`` of the head at this scale."""
    return (1000, 64) if scale.name == "toy" else (50257, 2048)


def inputs(vocab: int, width: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A frozen head ``[V, D]``, hidden states ``[B, T, D]`` (requiring grad) and short-answer labels ``[B, T]``."""
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(width, vocab, bias=False).requires_grad_(False).to(device())
    hidden = torch.randn(ROWS, LENGTH, width, generator=g).to(device()).requires_grad_(True)
    labels = torch.full((ROWS, LENGTH), IGNORE_INDEX)
    for i in range(ROWS):
        end = LENGTH - 2 * i  # right padding after the answer: the targets sit at different columns
        labels[i, end - ANSWER:end] = torch.randint(3, vocab, (ANSWER,), generator=g)
    return head, hidden, labels.to(device())


def step(loss_fn: Any, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward + backward to ``hidden``; the loss value."""
    with autocast():
        loss = loss_fn(hidden, head, labels)
    loss.backward()
    hidden.grad = None
    return float(loss.detach())


def full_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full logits ``[B, T, V]``, then the next-token loss."""
    return causal_lm_loss(head(hidden), labels)


def run(scale: Scale, data: Any = None) -> list[dict[str, Any]]:
    vocab, width = sizes(scale)
    head, hidden, labels = inputs(vocab, width)
    sides = {"mmlm": causal_head_loss, "reference": full_loss}
    values = {name: step(fn, head, hidden, labels) for name, fn in sides.items()}  # warm-up, and the same loss
    if abs(values["mmlm"] - values["reference"]) > 1e-3 * abs(values["reference"]):
        raise AssertionError(f"lm_head: target-only loss {values['mmlm']} != full-logits loss {values['reference']}")
    memory = {name: peak_bytes(lambda fn=fn: step(fn, head, hidden, labels)) for name, fn in sides.items()}
    steps = 1 if scale.name == "toy" else 2
    times = alternate({name: lambda fn=fn: median([timed(lambda: step(fn, head, hidden, labels))
                                                   for _ in range(steps)])
                       for name, fn in sides.items()}, scale.repeats)
    what = f"{ROWS}×{LENGTH} tokens, {ANSWER} targets/row, V={vocab:,}, D={width:,}"
    rows = [row(f"LM head + loss peak memory, target rows vs full logits ({what})", memory["mmlm"] / 2**20,
                memory["reference"] / 2**20, "MiB", memory["mmlm"] / memory["reference"], "<= 0.2")]
    if scale.name != "toy":  # toy checks the harness (one row per benchmark); its times mean nothing
        rows.append(row(f"LM head + loss step, target rows vs full logits ({what})", times["mmlm"] * 1e3,
                        times["reference"] * 1e3, "ms/step", times["mmlm"] / times["reference"], "<= 1.0"))
    return rows
