"""Activation checkpointing through frozen LMs: a frozen LM stays in eval mode, where transformers' own
checkpointing does nothing, yet gradients flow through it to the prefix (or to its LoRA adapters). ``grad_checkpointing``
recomputes each block in either mode: 2 forward calls per block and step with it, 1 without, the same gradients, and
a lower peak of allocated memory (torch profiler, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmlm.language import GenerationConfig, HFCausalLM, HFSeq2SeqLM, SubLNDecoder
from mmlm.lora import LoRA

GPT2 = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}
T5 = {"model_type": "t5", "vocab_size": 50, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def gpt2(**kwargs):
    return HFCausalLM(config=GPT2, **kwargs)


def subln(**kwargs):
    return SubLNDecoder(vocab_size=50, width=32, depth=2, num_heads=4, position="rotary", **kwargs)


def t5(**kwargs):
    return HFSeq2SeqLM(config=T5, **kwargs)


def first_block(lm) -> torch.nn.Module:
    if isinstance(lm, SubLNDecoder):
        return lm.layers[0]
    return lm.model.transformer.h[0] if isinstance(lm, HFCausalLM) else lm.model.encoder.block[0]


def step(lm, seed: int = 0) -> tuple[int, torch.Tensor]:
    """One forward + backward through ``lm`` from a trainable prefix: (forward calls of the first block, its grad)."""
    calls = []
    handle = first_block(lm).register_forward_pre_hook(lambda module, args: calls.append(1))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the same dropout masks (the recomputation replays them)
    prefix = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    labels = torch.randint(3, 50, (2, 6), generator=generator)
    lm(prefix, torch.ones(2, 6, dtype=torch.long), labels).loss.backward()
    handle.remove()
    return len(calls), prefix.grad


@pytest.mark.parametrize("build", [gpt2, subln, t5])
@pytest.mark.parametrize("extra", [{"freeze": True}, {"lora": LoRA(rank=4, dropout=0.0)}, {}],
                         ids=["frozen", "lora", "trainable"])
def test_blocks_are_recomputed_in_train_and_eval_mode(build, extra):
    torch.manual_seed(0)
    plain = build(**extra)
    torch.manual_seed(0)
    checkpointed = build(grad_checkpointing=True, **extra)
    for lm in (plain, checkpointed):
        lm.train()  # a frozen base stays in eval mode: transformers' checkpointing would not recompute it
        assert lm.model.training is not lm.frozen if hasattr(lm, "model") else lm.layers[0].training is not lm.frozen
    calls, grad = step(plain)
    calls_checkpointed, grad_checkpointed = step(checkpointed)
    assert (calls, calls_checkpointed) == (1, 2)
    torch.testing.assert_close(grad_checkpointed, grad)
    trainable = [p for p in checkpointed.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)


def test_generation_is_unchanged_and_not_recomputed():
    torch.manual_seed(0)
    plain = gpt2(freeze=True).eval()
    torch.manual_seed(0)
    checkpointed = gpt2(freeze=True, grad_checkpointing=True).eval()
    prompt, mask = torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.long)
    config = GenerationConfig(max_new_tokens=5)
    assert torch.equal(checkpointed.generate(prompt, mask, config), plain.generate(prompt, mask, config))


def peak_allocated(grad_checkpointing: bool) -> int:
    """Peak bytes allocated (torch profiler, CPU) by one forward + backward of a frozen mid-size GPT-2 (8 layers,
    width 256, 4 x 256 tokens) from a trainable prefix."""
    torch.manual_seed(0)
    config = {**GPT2, "vocab_size": 100, "n_embd": 256, "n_layer": 8, "n_head": 4, "n_positions": 256}
    lm = HFCausalLM(config=config, freeze=True, grad_checkpointing=grad_checkpointing)
    prefix = torch.randn(4, 256, 256, requires_grad=True)
    labels = torch.randint(3, 100, (4, 256))
    mask = torch.ones(4, 256, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lm(prefix, mask, labels).loss.backward()
    return max(e["args"]["Total Allocated"] for e in trace_events(prof) if e.get("name") == "[memory]")


def trace_events(prof) -> list[dict]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        prof.export_chrome_trace(file.name)
        return json.load(open(file.name))["traceEvents"]


def test_checkpointing_lowers_peak_memory_through_a_frozen_lm():
    without, with_checkpointing = peak_allocated(False), peak_allocated(True)
    print(f"peak allocated: {without / 2**20:.1f} MiB without, {with_checkpointing / 2**20:.1f} MiB with")
    assert with_checkpointing < 0.5 * without  # measured: ~189 MiB vs ~42 MiB
