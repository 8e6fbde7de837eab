"""Memory and step time of a 1.3B-shaped language model behind a soft prompt, the LM part of BLIP-2 stage 2 / Frozen /
PaLM-E, in bfloat16 on the CPU: full finetuning vs LoRA vs a frozen LM with and without activation checkpointing.

The LM is ``HFCausalLM`` over a random OPT-1.3B-shaped config (24 layers × 2,048, FFN 8,192, vocabulary 50,272;
toy scale: 2 × 64) in bfloat16. A step: a trainable soft prompt of 32 vectors (what the Q-Former and projection
give) + 16 text tokens, batch 2, the target-only LM loss on the last 4 tokens, backward, AdamW on every trainable
tensor (the prompt; the LM too when fully finetuned; the adapters with LoRA: rank 16 on the attention projections).
Each mode runs in a fresh process: peak resident memory (``ru_maxrss``) minus the memory after the imports — the
model, gradients, optimizer state and activations — and the median time of 3 steps after a warm-up.
The reference of each row: full finetuning, except for checkpointing (the frozen LM without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import Scale, row

ROOT = Path(__file__).resolve().parents[2]
MODES = ("full", "lora", "frozen", "frozen_checkpointing")

PROBE = """
import json, resource, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from mmlm.language import HFCausalLM
from mmlm.lora import LoRA
def rss_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss_kib()
mode, toy = {mode!r}, {toy!r}
width, layers, ffn = (64, 2, 128) if toy else (2048, 24, 8192)
config = {{"model_type": "opt", "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": 2 if toy
          else 32, "ffn_dim": ffn, "vocab_size": 50272, "word_embed_proj_dim": width, "max_position_embeddings": 2048,
          "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}}
torch.manual_seed(0)
lm = HFCausalLM(config=config, dtype="bfloat16", freeze=mode != "full",
                grad_checkpointing=mode == "frozen_checkpointing",
                lora=LoRA(rank=16, dropout=0.0) if mode == "lora" else None)
lm.train()
prompt = torch.nn.Parameter(torch.randn(2, 32, width, dtype=torch.bfloat16) * 0.02)
ids = torch.randint(3, 50272, (2, 16))
mask = torch.ones(2, 48, dtype=torch.long)
labels = torch.full((2, 48), -100)
labels[:, -4:] = ids[:, -4:]
params = [prompt] + [p for p in lm.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-5)
def step():
    embeds = torch.cat([prompt, lm.embed(ids)], dim=1)
    loss = lm(embeds, mask, labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
step()
times = []
for _ in range(3):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({{"added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                   "step_s": statistics.median(times), "params": sum(p.numel() for p in lm.parameters()),
                   "trainable": sum(p.numel() for p in params)}}))
"""


def measure(mode: str, toy: bool) -> dict[str, Any]:
    """Run :data:`PROBE` for ``mode`` in a fresh process; its JSON line."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), mode=mode, toy=toy)],
                          capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"large_lm {mode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(scale: Scale, data: Any = None) -> list[dict[str, Any]]:
    toy = scale.name == "toy"
    results = {mode: measure(mode, toy) for mode in (("frozen", "frozen_checkpointing") if toy else MODES)}
    size = f"{results['frozen']['params'] / 1e9:.2f}B-parameter OPT-shaped LM, bf16, 2 × (32 prompt + 16 tokens)"
    pairs = [("frozen_checkpointing", "frozen", "frozen LM, activation checkpointing vs without")]
    if not toy:
        pairs = [("lora", "full", "LoRA rank 16 vs full finetuning"), ("frozen", "full", "frozen LM vs full finetuning"),
                 *pairs]
    rows = []
    for mode, reference, what in pairs:
        ours, theirs = results[mode], results[reference]
        rows.append(row(f"peak host memory, {what} ({size})", ours["added_mib"], theirs["added_mib"], "MiB",
                        ours["added_mib"] / theirs["added_mib"], "< 1.0" if mode != "frozen_checkpointing" else None))
        if not toy:
            rows.append(row(f"step time, {what} ({size})", ours["step_s"], theirs["step_s"], "s/step",
                            ours["step_s"] / theirs["step_s"], None))
    return rows
