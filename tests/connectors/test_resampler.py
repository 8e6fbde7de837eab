"""Perceiver resampler: shapes, padding, token order, grads, building from a config, learning a toy task."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from mmlm.connectors import Resampler

TINY = dict(num_latents=3, depth=2, num_heads=2, head_dim=4, ff_mult=2)


def tiny(**kwargs) -> Resampler:
    torch.manual_seed(0)
    return Resampler(6, 10, **{**TINY, **kwargs}).eval()


@pytest.mark.parametrize("num_tokens", [1, 4, 17])
def test_output_has_one_embedding_per_latent_whatever_the_number_of_image_tokens(num_tokens):
    out = tiny()(torch.randn(2, num_tokens, 6))
    assert out.shape == (2, 3, 10)


def test_internal_width_is_heads_times_head_dim():
    resampler = tiny()
    assert resampler.width == 8 and resampler.latents.shape == (3, 8) and resampler.num_latents == 3
    assert (resampler.input_proj.in_features, resampler.input_proj.out_features) == (6, 8)
    assert (resampler.proj.in_features, resampler.proj.out_features) == (8, 10)
    assert len(resampler.layers) == 2


@pytest.mark.parametrize("max_media_tokens", [None, 12])
def test_masked_padding_tokens_do_not_change_the_output(max_media_tokens):
    resampler = tiny(max_media_tokens=max_media_tokens)
    torch.manual_seed(1)
    tokens = torch.randn(2, 5, 6)
    padded = torch.cat([tokens, 100 * torch.randn(2, 4, 6)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 4] * 2)
    torch.testing.assert_close(resampler(padded, mask), resampler(tokens))
    torch.testing.assert_close(resampler(padded, mask.bool()), resampler(tokens, torch.ones(2, 5)))
    assert not torch.allclose(resampler(padded), resampler(tokens), atol=1e-4)  # the mask is what hides them


def test_a_ragged_batch_matches_each_sample_alone():
    resampler = tiny()
    torch.manual_seed(1)
    tokens = torch.randn(2, 6, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    out = resampler(tokens, mask)
    torch.testing.assert_close(out[0], resampler(tokens[:1])[0])
    torch.testing.assert_close(out[1], resampler(tokens[1:, :2])[0])


def test_without_positions_the_output_ignores_token_order():
    resampler = tiny()
    torch.manual_seed(1)
    tokens, order = torch.randn(2, 7, 6), torch.randperm(7)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    torch.testing.assert_close(resampler(tokens[:, order], mask[:, order]), resampler(tokens, mask))


def test_with_positions_the_output_depends_on_token_order():
    resampler = tiny(max_media_tokens=7)
    assert resampler.media_pos is not None and resampler.media_pos.shape == (7, 8)
    torch.manual_seed(1)
    tokens = torch.randn(2, 7, 6)
    flipped = resampler(tokens.flip(1))
    assert not torch.allclose(flipped, resampler(tokens), atol=1e-4)


def test_more_image_tokens_than_positions_is_an_error_naming_the_setting():
    with pytest.raises(ValueError, match="8 image tokens.*max_media_tokens=7"):
        tiny(max_media_tokens=7)(torch.randn(1, 8, 6))


def test_mask_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), expected \(2, 5\)"):
        tiny()(torch.randn(2, 5, 6), torch.ones(2, 4))


@pytest.mark.parametrize("name", ["num_latents", "depth", "num_heads", "head_dim", "ff_mult", "max_media_tokens"])
def test_invalid_sizes_are_errors_naming_the_argument(name):
    with pytest.raises(ValueError, match=rf"{name} must be >= 1, got 0"):
        Resampler(6, 10, **{**TINY, name: 0})


@pytest.mark.parametrize("max_media_tokens", [None, 9])
def test_grads_reach_inputs_and_every_parameter(max_media_tokens):
    resampler = tiny(max_media_tokens=max_media_tokens).train()
    tokens = torch.randn(2, 9, 6, requires_grad=True)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    resampler(tokens, mask).square().mean().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()
    assert tokens.grad[1, 5:].abs().max() == 0  # padding gets no gradient
    for name, param in resampler.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_half_precision_tokens_are_cast_to_the_resampler_dtype():
    out = tiny()(torch.randn(1, 4, 6).half())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_builds_from_a_callable_argument_with_config_values():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--connector", type=Callable[[int, int], nn.Module])
    spec = {"class_path": "mmlm.connectors.Resampler",
            "init_args": {"num_latents": 5, "depth": 1, "num_heads": 2, "head_dim": 4, "max_media_tokens": 16}}
    init = parser.instantiate_classes(parser.parse_args(["--connector", json.dumps(spec)]))
    connector = init.connector(6, 10)
    assert isinstance(connector, Resampler)
    assert connector.num_latents == 5 and connector.width == 8 and len(connector.layers) == 1
    assert connector(torch.randn(2, 16, 6)).shape == (2, 5, 10)


def test_learns_to_read_the_mean_image_token_into_a_latent():
    """Latent 0 learns to output the mean of the (unmasked) image tokens."""
    torch.manual_seed(0)
    resampler = Resampler(4, 4, num_latents=2, depth=1, num_heads=2, head_dim=8, ff_mult=2)
    optimizer = torch.optim.Adam(resampler.parameters(), lr=3e-3)

    def loss_on_fresh_batch() -> torch.Tensor:
        tokens = torch.randn(32, 6, 4) + 2 * torch.randn(32, 1, 4)  # per-sample offset: mean has variance ~4
        return (resampler(tokens)[:, 0] - tokens.mean(1)).square().mean()

    with torch.no_grad():
        initial = sum(loss_on_fresh_batch() for _ in range(4)) / 4
    for _ in range(200):
        optimizer.zero_grad()
        loss = loss_on_fresh_batch()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = sum(loss_on_fresh_batch() for _ in range(4)) / 4
    assert final < 0.2 * initial, (initial, final)
