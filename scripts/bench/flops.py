"""Achieved FLOP/s of a GPT-2-style decoder training step as a fraction of a measured matmul peak.

Model: ``HFCausalLM`` over a config-dict GPT-2 (4 layers, width 256, 4 heads, 1024-word vocabulary), batch
``B`` of ``T``-token sequences, one step = forward, cross-entropy, backward, AdamW. FLOPs per step
(Kaplan et al. 2020 / PaLM appendix B)::

    FLOPs = 6 · N · B·T  +  12 · L · d · T · B·T

``N`` = parameters doing matmuls: all parameters except the position table (``wpe``, a lookup); the tied
token table is counted once, as the LM head. The second term is attention scores and values (``QKᵀ`` and
``A·V``: 2·2·T·d per token and layer forward, ×3 with backward), counted over the full ``T × T`` square since
CPU SDPA does not skip the masked half. Peak = ``2·n³ / t`` of an ``n × n`` fp32 matmul (CPU), timed in
alternation with the steps; ratio = achieved / peak (the model FLOP utilisation, MFU).

CUDA path (untested: no GPU here): bf16 autocast for the step and a bf16 matmul of side ≥ 8192 for the peak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from common import Scale, alternate, autocast, device, row, step_times, timed

from mmlm.language import HFCausalLM

LAYERS, WIDTH, HEADS, VOCAB = 4, 256, 4, 1024


def model_flops(lm: HFCausalLM, batch: int, seq: int) -> float:
    """Training FLOPs of one step (see the module docstring)."""
    params = sum(p.numel() for name, p in lm.model.named_parameters() if "wpe" not in name)
    tokens = batch * seq
    return 6 * params * tokens + 12 * LAYERS * WIDTH * seq * tokens


def train_steps(lm: HFCausalLM, ids: torch.Tensor):
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
    config = {"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": scale.flops_seq, "n_embd": WIDTH,
              "n_layer": LAYERS, "n_head": HEADS, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    lm = HFCausalLM(config=config).to(device()).train()
    batch = max(1, scale.batch_size // 4)
    ids = torch.randint(3, VOCAB, (batch, scale.flops_seq), device=device())
    steps = train_steps(lm, ids)
    flops = model_flops(lm, batch, scale.flops_seq)
    n = max(scale.matmul, 8192) if torch.cuda.is_available() else scale.matmul
    rate = alternate({"mmlm": lambda: flops / step_times(steps, scale.warmup, scale.steps),
                      "reference": lambda: matmul_peak(n)}, scale.repeats)
    kind = "bf16 autocast, MFU" if torch.cuda.is_available() else "fp32"
    return [row(f"GPT-2 step FLOP/s vs {n}² matmul peak ({kind}; {batch}×{scale.flops_seq} tokens)",
                rate["mmlm"] / 1e9, rate["reference"] / 1e9, "GFLOP/s", rate["mmlm"] / rate["reference"], None)]
