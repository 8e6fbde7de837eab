"""Sub-LN decoder: rotary / xPos positions and packed sequences (block-diagonal attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmlm.language import GenerationConfig, SubLNDecoder
from mmlm.language.subln import RelativePositions, Rotation, decayed_attention, middle, rotate

V, D = 40, 16
TINY = {"vocab_size": V, "width": D, "depth": 2, "num_heads": 2, "ffn_mult": 2, "max_positions": 32}
RELATIVE = ["rotary", "xpos"]


def build(position: str, **kwargs) -> SubLNDecoder:
    torch.manual_seed(0)
    return SubLNDecoder(**{**TINY, "position": position, "xpos_scale_base": 8.0, **kwargs}).eval()


def ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, V, (1, length), generator=torch.Generator().manual_seed(seed))


def test_xpos_scales_multiply_to_a_decay_in_the_distance_only():
    pos = RelativePositions(head_dim=8, scale_base=4.0)
    positions = [0, 2, 7]
    _, _, q_scale, k_scale = pos(torch.tensor([positions]), center=torch.tensor([3]))
    zeta = (torch.arange(0, 8, 2) + 3.2) / 11.2
    for i, n in enumerate(positions):
        for j, m in enumerate(positions):
            torch.testing.assert_close(q_scale[0, 0, i] * k_scale[0, 0, j], zeta ** ((n - m) / 4.0))
    assert (zeta < 1).all()  # so the product decays with distance n - m > 0


def test_rotary_matches_complex_multiplication():
    pos = RelativePositions(head_dim=4, scale_base=None)
    x = torch.randn(1, 1, 3, 4)
    cos, sin, q_scale, _ = pos(torch.tensor([[0, 1, 5]]))
    out = rotate(x, cos, sin, q_scale)
    freqs = 10000 ** (-torch.arange(0, 4, 2) / 4)
    z = torch.complex(x[..., :2], x[..., 2:]) * torch.polar(torch.ones(3, 2), torch.tensor([0, 1, 5.0])[:, None] * freqs)
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1))


@pytest.mark.parametrize("position", RELATIVE)
def test_relative_positions_are_shift_invariant_and_causal(position):
    lm = build(position)
    x = lm.embed(ids(6, 1))
    mask = torch.ones(1, 6, dtype=torch.long)
    base = lm(x, mask).logits
    shifted = lm(x, mask, position_ids=torch.arange(6)[None] + 5, segment_ids=mask).logits
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)
    changed = x.clone()
    changed[:, 4:] = lm.embed(ids(2, 9))
    torch.testing.assert_close(lm(changed, mask).logits[:, :4], base[:, :4])
    assert not torch.allclose(lm(changed, mask).logits[:, 4:], base[:, 4:])


@pytest.mark.parametrize("position", RELATIVE)
def test_relative_positions_left_padding_and_kv_cache_generation(position):
    lm = build(position)
    rows = [lm.embed(ids(n, n))[0] for n in (2, 5)]
    embeds = torch.zeros(2, 5, D)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, row in enumerate(rows):
        embeds[i, 5 - len(row):], mask[i, 5 - len(row):] = row, 1
    config = GenerationConfig(max_new_tokens=5)
    batched = lm.generate(embeds, mask, config)
    for row, out in zip(rows, batched):
        alone = lm.generate(row[None], torch.ones(1, len(row), dtype=torch.long), config)[0]
        assert out[:len(alone)].tolist() == alone.tolist()
        seq = row[None]  # no-cache reference
        for token in alone.tolist():
            assert lm(seq, torch.ones(1, seq.shape[1], dtype=torch.long)).logits[0, -1].argmax() == token
            seq = torch.cat([seq, lm.embed(torch.tensor([[token]]))], dim=1)


@pytest.mark.parametrize("position", ["learned", *RELATIVE])
def test_packed_row_equals_each_sample_alone(position):
    lm = build(position)
    a, b = ids(4, 1), ids(3, 2)
    row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
    packed = lm(lm.embed(row), (segments > 0).long(), segment_ids=segments).logits[0]
    for sample, where in ((a, slice(0, 4)), (b, slice(4, 7))):
        alone = lm(lm.embed(sample), torch.ones_like(sample)).logits[0]
        torch.testing.assert_close(packed[where], alone, atol=1e-5, rtol=1e-5)
    assert packed.isfinite().all()


def test_packed_gradients_do_not_cross_samples():
    lm = build("xpos")
    x = lm.embed(ids(7, 3)).detach().requires_grad_()
    segments = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])
    logits = lm(x, torch.ones_like(segments), segment_ids=segments).logits
    logits[0, 3:].sum().backward()  # only sample 2's outputs
    assert x.grad[0, :3].abs().sum() == 0 and x.grad[0, 3:].abs().sum() > 0


def test_xpos_save_reload_and_bad_position(tmp_path):
    lm = build("xpos")
    lm.save_pretrained(str(tmp_path))
    again = SubLNDecoder.from_pretrained(str(tmp_path)).eval()
    x = lm.embed(ids(5, 4))
    torch.testing.assert_close(again(x, torch.ones(1, 5)).logits, lm(x, torch.ones(1, 5)).logits)
    assert again.config["position"] == "xpos" and again.embed_positions is None
    with pytest.raises(ValueError, match="position='alibi'"):
        SubLNDecoder(vocab_size=V, width=D, position="alibi")
    assert math.isclose(again.config["xpos_scale_base"], 8.0)


def attention_inputs(length: int, head_dim: int = 8, heads: int = 2, dtype=torch.float32, seed: int = 0):
    """Random rotated ``q, k, v [1, H, L, d]``, the causal mask and the positions ``0 … L-1``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    return q, k, v, mask, torch.arange(length)[None]


def test_centring_matches_torchscale():
    assert middle(torch.arange(7)[None]).tolist() == [4]  # XPOS: min_pos = -(7) // 2 = -4, so position 0 → -4
    assert middle(torch.arange(8)[None] + 3).tolist() == [3 + 4]


def test_xpos_attention_equals_the_previous_fixed_centre_within_the_trained_range():
    """Within max_positions the old scales (centred on max_positions // 2) and the new ones (centred on the
    current length) give the same attention: the centre cancels in every query-key product."""
    max_positions, base = 64, 8.0
    relative = RelativePositions(8, base)
    for length in (5, 40, max_positions):
        q, k, v, mask, positions = attention_inputs(length)
        _, _, q_old, k_old = relative(positions, center=torch.tensor([max_positions // 2]))
        previous = F.scaled_dot_product_attention(rotate(q, None, None, q_old), rotate(k, None, None, k_old), v,
                                                  attn_mask=mask)
        now = decayed_attention(q, k, v, mask, Rotation(None, None, positions, positions, relative), 0.0)
        torch.testing.assert_close(now, previous, atol=1e-5, rtol=1e-5)


def test_query_blocks_give_the_single_block_attention():
    """Past the span a dtype holds, blocks centred on themselves give what float64 computes in one block."""
    relative = RelativePositions(8, 2.0)
    assert relative.block_span(torch.float32) < 300 < relative.block_span(torch.float64)
    q, k, v, mask, positions = attention_inputs(700)
    blocked = decayed_attention(q, k, v, mask, Rotation(None, None, positions, positions, relative), 0.0)
    exact = decayed_attention(q.double(), k.double(), v.double(), mask,
                              Rotation(None, None, positions, positions, relative.double()), 0.0)
    assert blocked.isfinite().all()
    torch.testing.assert_close(blocked.double(), exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_base", [512.0, 64.0, 8.0])
def test_xpos_is_finite_at_four_times_max_positions_in_half_precision(dtype, scale_base):
    torch.manual_seed(0)
    lm = SubLNDecoder(vocab_size=V, width=D, depth=1, num_heads=1, ffn_mult=2, max_positions=2048, position="xpos",
                      xpos_scale_base=scale_base, dtype=str(dtype).split(".")[1]).eval()
    tokens = ids(4 * 2048, 5)
    with torch.no_grad():
        logits = lm(lm.embed(tokens), torch.ones_like(tokens)).logits
    assert logits.isfinite().all()
    if dtype == torch.float16:  # the old scales, centred on max_positions // 2, did not fit in fp16
        old = RelativePositions(D, scale_base)(torch.arange(4 * 2048)[None], center=torch.tensor([1024]))
        assert not torch.cat([s.to(dtype) for s in old[2:]]).isfinite().all()
