"""Long sequences: the Sub-LN decoder's training step from 512 to 8,192 tokens, fused causal SDPA vs the math path.

mmlm: ``SubLNDecoder`` on unpadded rows, which attends with ``F.scaled_dot_product_attention(is_causal=True)`` and no
mask tensor, so SDPA picks its fused kernel (the flash kernel on CPU, FlashAttention on GPU) and never holds a
``[T, T]`` matrix. Reference: the same model and weights with the explicit ``[B, 1, T, T]`` causal mask (what the
decoder built for every batch before) under ``sdpa_kernel(SDPBackend.MATH)``, which materialises the ``[B, H, T, T]``
scores and probabilities. Shapes: batch 1, width 256, 4 heads, 2 layers, rotary positions, vocabulary 1,000 (toy:
width 32, 128 tokens). A step = forward, the next-token loss over every position and the backward pass.
Rows: real tokens/s and the peak memory a step adds (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the torch
profiler's net allocation of each op in time order), per length. Both sides give the same loss (checked).
"""

from __future__ import annotations

from typing import Any

import torch
from common import Scale, alternate, autocast, device, peak_bytes, row, timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmlm.language import SubLNDecoder
from mmlm.language.subln import attention_bias
from mmlm.losses import causal_head_loss


def lengths(scale: Scale) -> tuple[int, ...]:
    """Sequence lengths measured at this scale."""
    return (128,) if scale.name == "toy" else (512, 1024, 2048, 4096, 8192)


def model(scale: Scale) -> SubLNDecoder:
    """The decoder, in train mode (no dropout), on the benchmark device."""
    width = 32 if scale.name == "toy" else 256
    torch.manual_seed(0)
    return SubLNDecoder(vocab_size=1000, width=width, depth=2, num_heads=4, ffn_mult=4, position="rotary",
                        max_positions=max(lengths(scale))).to(device()).train()


def fused_loss(lm: SubLNDecoder, ids: torch.Tensor) -> torch.Tensor:
    """mmlm's forward on the unpadded row: causal SDPA without a mask tensor."""
    return lm(lm.embed(ids), torch.ones_like(ids), labels=ids).loss


def math_loss(lm: SubLNDecoder, ids: torch.Tensor) -> torch.Tensor:
    """The reference: the explicit causal mask and SDPA's math kernel."""
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with sdpa_kernel(SDPBackend.MATH):
        hidden, _ = lm._decode(lm.embed(ids), positions, mask, mask=attention_bias(mask, ids.shape[1]))
    return causal_head_loss(hidden, lm._logits, ids)


def step(loss_fn: Any, lm: SubLNDecoder, ids: torch.Tensor) -> float:
    """One forward + backward; the loss value (gradients dropped)."""
    with autocast():
        loss = loss_fn(lm, ids)
    loss.backward()
    lm.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(scale: Scale, data: Any = None) -> list[dict[str, Any]]:
    lm = model(scale)
    sides = {"mmlm": fused_loss, "reference": math_loss}
    rows = []
    for length in lengths(scale):
        ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(length)).to(device())
        values = {name: step(fn, lm, ids) for name, fn in sides.items()}  # warm-up, and the same loss
        if abs(values["mmlm"] - values["reference"]) > (2e-2 if torch.cuda.is_available() else 1e-3) * abs(
                values["reference"]):  # bf16 autocast on CUDA
            raise AssertionError(f"long_sequences: fused loss {values['mmlm']} != math loss {values['reference']}")
        memory = {name: peak_bytes(lambda fn=fn, ids=ids: step(fn, lm, ids)) for name, fn in sides.items()}
        repeats = 1 if scale.name == "toy" else min(scale.repeats, 3)
        times = alternate({name: lambda fn=fn, ids=ids: timed(lambda: step(fn, lm, ids))
                           for name, fn in sides.items()}, repeats)
        what = f"{length:,} tokens, batch 1, width {lm.width}, 2 layers"
        rows.append(row(f"Sub-LN decoder step peak memory, fused causal SDPA vs math path ({what})",
                        memory["mmlm"] / 2**20, memory["reference"] / 2**20, "MiB",
                        memory["mmlm"] / memory["reference"], "<= 1.0"))
        if scale.name != "toy":  # toy checks the harness; its times mean nothing
            rows.append(row(f"Sub-LN decoder training tokens/s, fused causal SDPA vs math path ({what})",
                            length / times["mmlm"], length / times["reference"], "tokens/s",
                            times["reference"] / times["mmlm"], ">= 1.0"))
    return rows
