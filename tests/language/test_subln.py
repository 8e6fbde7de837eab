"""Tests of the built-in Sub-LN (MAGNETO) decoder on tiny random configs (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from mmlm.language import GenerationConfig, LanguageModel, SubLNDecoder
from mmlm.language.subln import magneto_gamma

V, D = 50, 32
TINY = {"vocab_size": V, "width": D, "depth": 2, "num_heads": 2, "ffn_mult": 2, "max_positions": 64}
GREEDY = GenerationConfig(max_new_tokens=6)


def build(**kwargs) -> SubLNDecoder:
    """A tiny decoder with reproducible random weights, in eval mode."""
    torch.manual_seed(0)
    return SubLNDecoder(**{**TINY, **kwargs}).eval()


def prompt_ids(batch: int = 3, length: int = 5, seed: int = 0) -> torch.Tensor:
    """Random non-special token ids ``[B, T]``."""
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[T_i, D]`` rows with random vectors → ``embeds [B, T, D]``, ``mask [B, T]``."""
    length = max(len(r) for r in rows)
    embeds, mask = torch.randn(len(rows), length, D), torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        embeds[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return embeds, mask


def ones(ids: torch.Tensor) -> torch.Tensor:
    """An all-real attention mask like ``ids``."""
    return torch.ones(ids.shape[:2], dtype=torch.long)


def strip_pad(row: torch.Tensor, pad_id: int = 0) -> list[int]:
    """Token ids with trailing padding removed."""
    ids = row.tolist()
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def test_shapes_and_attributes():
    lm = build()
    ids = prompt_ids()
    assert isinstance(lm, LanguageModel) and (lm.width, lm.vocab_size) == (D, V)
    assert lm.embed(ids).shape == (3, 5, D)
    out = lm(lm.embed(ids), ones(ids))
    assert out.logits.shape == (3, 5, V) and out.loss is None


def test_future_tokens_do_not_change_past_logits():
    lm = build()
    ids = prompt_ids(2, 6)
    changed = ids.clone()
    changed[:, 4:] = prompt_ids(2, 2, seed=5)
    a, b = lm(lm.embed(ids), ones(ids)).logits, lm(lm.embed(changed), ones(ids)).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_left_padding_invariance_logits():
    lm = build()
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5, 3)]
    logits = lm(*left_pad(rows)).logits
    assert logits.isfinite().all()
    for row, out in zip(rows, logits):
        alone = lm(row[None], ones(row[None])).logits[0]
        torch.testing.assert_close(out[-len(row):], alone, atol=1e-5, rtol=1e-5)


def test_left_padding_invariance_greedy_generation():
    lm = build()
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5, 3)]
    batched = lm.generate(*left_pad(rows), GREEDY)
    assert batched.shape[0] == 3 and 1 <= batched.shape[1] <= GREEDY.max_new_tokens
    for row, out in zip(rows, batched):
        alone = lm.generate(row[None], ones(row[None]), GREEDY)[0]
        assert strip_pad(out) == strip_pad(alone)


def no_cache_greedy(lm: SubLNDecoder, embeds: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoding: full forward over the growing sequence, argmax of the last logits."""
    eos, pad = lm.config["eos_token_id"], lm.config["pad_token_id"]
    done = torch.zeros(len(embeds), dtype=torch.bool)
    out = []
    for _ in range(steps):
        tokens = lm(embeds, mask).logits[:, -1].argmax(-1).masked_fill(done, pad)
        out.append(tokens)
        done |= tokens == eos
        embeds = torch.cat([embeds, lm.embed(tokens[:, None])], dim=1)
        mask = torch.cat([mask, ones(tokens[:, None])], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("eos", [2, 7])
def test_kv_cache_generation_equals_no_cache_loop(eos):
    lm = build(eos_token_id=eos)
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (4, 1, 3)]
    embeds, mask = left_pad(rows)
    config = GenerationConfig(max_new_tokens=8)
    ours = lm.generate(embeds, mask, config)
    ref = no_cache_greedy(lm, embeds, mask, config.max_new_tokens)
    assert torch.equal(ours, ref[:, :ours.shape[1]])
    if ours.shape[1] < config.max_new_tokens:  # stopped early: every row has ended
        assert (ref[:, ours.shape[1]:] == 0).all()


def test_greedy_stops_at_eos_and_pads_after():
    lm = build()
    ids = prompt_ids()
    first = lm.generate(lm.embed(ids), ones(ids), GREEDY)[:, 0]
    lm.config["eos_token_id"] = int(first[0])  # row 0 ends at once
    out = lm.generate(lm.embed(ids), ones(ids), GREEDY)
    assert out[0, 0] == first[0] and (out[0, 1:] == 0).all()
    lm.config["eos_token_id"] = 2
    never = lm.generate(lm.embed(ids), ones(ids), GenerationConfig(max_new_tokens=4, min_new_tokens=4))
    assert never.shape == (3, 4) and not (never == 2).any()


def test_beam_search_shape_and_one_beam_equals_greedy():
    lm = build()
    ids = prompt_ids()
    embeds, mask = lm.embed(ids), ones(ids)
    beam = lm.generate(embeds, mask, GenerationConfig(max_new_tokens=5, num_beams=3))
    assert beam.shape[0] == 3 and 1 <= beam.shape[1] <= 5 and beam.dtype == torch.long
    one = lm.beam_search(embeds, mask, GenerationConfig(max_new_tokens=5), num_beams=1)
    assert torch.equal(one, lm.generate(embeds, mask, GenerationConfig(max_new_tokens=5)))


def sequence_log_prob(lm: SubLNDecoder, embeds: torch.Tensor, new: torch.Tensor) -> float:
    """Sum of log-probabilities of ``new [T_new]`` after ``embeds [1, T, D]`` (teacher forced)."""
    full = torch.cat([embeds, lm.embed(new[None])], dim=1)
    logp = lm(full, ones(full)).logits[0, embeds.shape[1] - 1:-1].log_softmax(-1)
    return logp.gather(1, new[:, None]).sum().item()


def test_beam_search_scores_at_least_greedy_without_eos():
    lm = build(eos_token_id=V - 1)
    lm.embed_tokens.weight.data[V - 1] -= 100  # eos never wins, so all hypotheses have full length
    ids = prompt_ids(1, 4)
    embeds = lm.embed(ids)
    greedy = lm.generate(embeds, ones(ids), GenerationConfig(max_new_tokens=4))[0]
    beam = lm.generate(embeds, ones(ids), GenerationConfig(max_new_tokens=4, num_beams=4))[0]
    assert sequence_log_prob(lm, embeds, beam) >= sequence_log_prob(lm, embeds, greedy) - 1e-5


def test_beam_search_left_padding_invariance():
    lm = build()
    rows = [lm.embed(prompt_ids(1, n, seed=n))[0] for n in (2, 5)]
    config = GenerationConfig(max_new_tokens=5, num_beams=3)
    batched = lm.generate(*left_pad(rows), config)
    for row, out in zip(rows, batched):
        assert strip_pad(out) == strip_pad(lm.generate(row[None], ones(row[None]), config)[0])


def test_loss_ignores_minus_100():
    lm = build()
    ids, labels = prompt_ids(), prompt_ids(seed=2)
    masked = labels.clone()
    masked[:, 1:3] = -100
    out = lm(lm.embed(ids), ones(ids), masked)
    logits, targets = out.logits[:, :-1], masked[:, 1:]
    keep = targets != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep], targets[keep]))
    assert not torch.allclose(out.loss, lm(lm.embed(ids), ones(ids), labels).loss)
    assert lm(lm.embed(ids), ones(ids), torch.full_like(ids, -100)).loss.item() == 0.0


def test_tiny_model_learns_counting():
    torch.manual_seed(0)
    lm = SubLNDecoder(vocab_size=16, width=32, depth=2, num_heads=2, ffn_mult=2, max_positions=16).train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        start = torch.randint(3, 16, (16, 1))
        ids = 3 + (start - 3 + torch.arange(10)) % 13  # count upwards over ids 3..15
        loss = lm(lm.embed(ids), ones(ids), ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_reload_give_identical_logits(tie, tmp_path):
    lm = build(tie_embeddings=tie)
    ids = prompt_ids()
    lm.save_pretrained(str(tmp_path))
    again = SubLNDecoder.from_pretrained(str(tmp_path)).eval()
    assert again.config == lm.config
    torch.testing.assert_close(again(again.embed(ids), ones(ids)).logits, lm(lm.embed(ids), ones(ids)).logits,
                               rtol=0, atol=0)
    assert torch.equal(again.generate(again.embed(ids), ones(ids), GREEDY),
                       lm.generate(lm.embed(ids), ones(ids), GREEDY))


def test_from_pretrained_is_strict(tmp_path):
    build(tie_embeddings=False).save_pretrained(str(tmp_path))
    config = (tmp_path / "config.json").read_text().replace('"tie_embeddings": false', '"tie_embeddings": true')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(RuntimeError, match="lm_head"):
        SubLNDecoder.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        SubLNDecoder.from_pretrained(str(tmp_path / "missing"))


def test_frozen_stays_eval_and_passes_grads_to_embeds():
    lm = build(freeze=True).train()
    assert lm.frozen and not lm.training and not any(m.training for m in lm.modules())
    ids = prompt_ids()
    embeds = lm.embed(ids).detach().requires_grad_(True)
    lm(embeds, ones(ids), ids).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in lm.parameters())
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0 and embeds.grad.isfinite().all()


def test_trainable_gets_finite_grads_everywhere():
    lm = build(dropout=0.1).train()
    ids = prompt_ids()
    lm(lm.embed(ids), ones(ids), ids).loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in lm.parameters())


def test_magneto_init_scaling():
    depth = 6
    lm = build(width=64, depth=depth, num_heads=4)
    gamma = magneto_gamma(depth)
    assert gamma == pytest.approx(math.sqrt(math.log(2 * depth)))
    for layer in lm.layers:
        attn, ffn = layer.attn, layer.ffn
        plain = attn.q_proj.weight.std()  # Xavier std sqrt(2 / (64 + 64)), not scaled
        assert (attn.k_proj.weight.std() / plain).item() == pytest.approx(1.0, rel=0.06)
        for scaled in (attn.v_proj.weight, attn.out_proj.weight):
            assert (scaled.std() / plain).item() == pytest.approx(gamma, rel=0.06)
        for fc in (ffn.fc1.weight, ffn.fc2.weight):
            xavier = math.sqrt(2 / sum(fc.shape))
            assert fc.std().item() / xavier == pytest.approx(gamma, rel=0.06)


def test_subln_structure_has_inner_norms():
    layer = build().layers[0]
    assert layer.attn.inner_norm.normalized_shape == (D,)
    assert layer.ffn.inner_norm.normalized_shape == (2 * D,)


def test_resize_token_embeddings_keeps_rows_and_freezing():
    for tie in (True, False):
        lm = build(freeze=True, tie_embeddings=tie)
        old = lm.embed_tokens.weight.clone()
        lm.resize_token_embeddings(V + 3)
        assert lm.vocab_size == V + 3 and lm.config["vocab_size"] == V + 3
        assert torch.equal(lm.embed_tokens.weight[:V], old)
        ids = torch.tensor([[3, V + 2]])
        assert lm(lm.embed(ids), ones(ids)).logits.shape[-1] == V + 3
        assert not any(p.requires_grad for p in lm.parameters())


def test_bfloat16():
    lm = build(dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    ids = prompt_ids()
    out = lm(lm.embed(ids).float(), ones(ids), ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and out.loss.isfinite()
    assert lm.generate(lm.embed(ids), ones(ids), GenerationConfig(max_new_tokens=3, num_beams=2)).shape[0] == 3


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="eos_token_id=60"):
        SubLNDecoder(**{**TINY, "eos_token_id": 60})
    with pytest.raises(ValueError, match="num_heads=5"):
        SubLNDecoder(**{**TINY, "num_heads": 5})
    lm = build()
    ids = torch.full((1, 70), 3)
    with pytest.raises(ValueError, match="max_positions=64"):
        lm(lm.embed(ids), ones(ids))


def test_builds_from_class_path_config():
    parser = ArgumentParser()
    parser.add_argument("--lm", type=LanguageModel)
    parsed = parser.parse_object({"lm": {"class_path": "mmlm.language.SubLNDecoder",
                                         "init_args": {**TINY, "freeze": True}}})
    lm = parser.instantiate(parsed).lm
    assert type(lm) is SubLNDecoder and lm.frozen and lm.width == D and lm.config["depth"] == 2


@pytest.mark.parametrize("positions", ["learned", "rotary", "xpos"])
def test_unpadded_rows_attend_with_is_causal_and_no_mask_tensor(positions, monkeypatch):
    """Rows without padding run SDPA with ``is_causal`` and no ``[T, S]`` mask (the fused kernels' linear-memory
    path; xPos builds its causal mask for the blockwise decay); the logits equal those computed with the explicit
    causal mask, and a padded batch still passes a mask."""
    from mmlm.language.subln import attention_bias

    lm = build(position=positions)
    ids = prompt_ids(length=9)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    fast = lm(lm.embed(ids), ones(ids)).logits
    masked = (False, False)  # an explicit mask, no is_causal (xPos's blocks pass none)
    assert calls and all(c == ((True, True) if positions != "xpos" else masked) for c in calls)
    calls.clear()
    hidden, _ = lm._decode(lm.embed(ids), torch.arange(9).expand(3, 9), ones(ids), mask=attention_bias(ones(ids), 9))
    assert all(c == masked for c in calls)
    torch.testing.assert_close(fast, lm._logits(hidden), rtol=1e-5, atol=1e-5)
    calls.clear()
    mask = ones(ids)
    mask[0, :3] = 0
    lm(lm.embed(ids), mask)
    assert calls and all(c == masked for c in calls)
