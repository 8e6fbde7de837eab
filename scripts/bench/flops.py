"""Achieved FLOP/s of a Sub-LN decoder training step as a fraction of a measured matmul peak.

Model: mmlm's built-in ``SubLNDecoder`` (MAGNETO; CPU: 4 layers, width 256, 4 heads; CUDA: 12 layers, width
1024, 16 heads; 1024-word vocabulary), batch ``B`` of ``T``-token sequences, one step = forward,
cross-entropy, backward, AdamW. FLOPs per step (Kaplan et al. 2020 / PaLM appendix B)::

    FLOPs = 6 · N · B·T  +  12 · L · d · T · B·T

``N`` = parameters doing matmuls: all parameters except a position table (``embed_positions``, a lookup); the
tied token table is counted once, as the LM head. The second term is attention scores and values (``QKᵀ`` and
``A·V``: 2·2·T·d per token and layer forward, ×3 with backward), counted over the full ``T × T`` square since
CPU SDPA does not skip the masked half. Peak = ``2·n³ / t`` of an ``n × n`` fp32 matmul (CPU), timed in
alternation with the steps; ratio = achieved / peak (the model FLOP utilisation, MFU).

CUDA path: bf16 autocast for the step and a bf16 matmul of side ≥ 8192 for the peak (the GPU's achievable
dense bf16 rate, close to its data-sheet peak), and a larger model and sequence so the GPU is not idle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from common import Scale, alternate, autocast, device, row, step_times, timed

from mmlm.language.subln import SubLNDecoder

VOCAB = 1024


def sizes() -> tuple[int, int, int]:
    """``(layers, width, heads)``: small on CPU, large enough on CUDA to keep the GPU busy."""
    return (12, 1024, 16) if torch.cuda.is_available() else (4, 256, 4)


def model_flops(lm: SubLNDecoder, batch: int, seq: int) -> float:
    """Training FLOPs of one step (see the module docstring)."""
    params = sum(p.numel() for name, p in lm.named_parameters() if "embed_positions" not in name)
    tokens = batch * seq
    return 6 * params * tokens + 12 * lm.config["depth"] * lm.config["width"] * seq * tokens


def train_steps(lm: SubLNDecoder, ids: torch.Tensor):
    """Endless training steps on ``ids [B, T]`` (one ``next`` = one step)."""
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4)
    mask = torch.ones_like(ids)
    while True:
        with autocast():
            loss = lm(lm.embed(ids), mask, ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield


def matmul_peak(n: int) -> float:
    """FLOP/s of one ``n × n`` matmul (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    a = torch.randn(n, n, device=device(), dtype=dtype)
    b = torch.randn(n, n, device=device(), dtype=dtype)
    a @ b  # warm-up
    return 2 * n**3 / timed(lambda: a @ b)


def run(scale: Scale, data: Path) -> list[dict[str, Any]]:
    """One row: achieved GFLOP/s of the step vs the matmul peak (ratio = MFU; informational, no target)."""
    torch.manual_seed(0)
    layers, width, heads = sizes()
    cuda = torch.cuda.is_available()
    seq = 1024 if cuda and scale.name != "toy" else scale.flops_seq
    batch = 16 if cuda and scale.name != "toy" else max(1, scale.batch_size // 4)
    lm = SubLNDecoder(VOCAB, width=width, depth=layers, num_heads=heads, max_positions=seq).to(device()).train()
    ids = torch.randint(3, VOCAB, (batch, seq), device=device())
    steps = train_steps(lm, ids)
    flops = model_flops(lm, batch, seq)
    n = max(scale.matmul, 8192) if torch.cuda.is_available() else scale.matmul
    rate = alternate({"mmlm": lambda: flops / step_times(steps, scale.warmup, scale.steps),
                      "reference": lambda: matmul_peak(n)}, scale.repeats)
    kind = "bf16 autocast, MFU" if torch.cuda.is_available() else "fp32"
    return [row(f"Sub-LN decoder ({layers}×{width}) step FLOP/s vs {n}² matmul peak ({kind}; {batch}×{seq} tokens)",
                rate["mmlm"] / 1e9, rate["reference"] / 1e9, "GFLOP/s", rate["mmlm"] / rate["reference"], None)]
