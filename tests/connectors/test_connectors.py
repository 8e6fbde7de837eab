"""Connector contract tests: shapes, layer structure, finite grads, and building through jsonargparse."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from torch import nn

from mmlm.connectors import MLP, LinearPrefix


def check_grads(module: nn.Module, out: torch.Tensor) -> None:
    out.square().mean().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_linear_prefix_pools_then_maps_to_k_tokens():
    torch.manual_seed(0)
    connector = LinearPrefix(8, 16, num_tokens=3)
    tokens = torch.randn(2, 5, 8)
    out = connector(tokens)
    assert out.shape == (2, 3, 16)
    expected = F.linear(tokens.mean(1), connector.proj.weight, connector.proj.bias).view(2, 3, 16)
    torch.testing.assert_close(out, expected)
    check_grads(connector, out)


def test_linear_prefix_default_is_two_tokens():
    assert LinearPrefix(4, 6)(torch.randn(3, 7, 4)).shape == (3, 2, 6)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_mlp_maps_every_token(num_layers):
    torch.manual_seed(0)
    connector = MLP(8, 16, num_layers=num_layers, hidden_dim=12)
    out = connector(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 16)
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers
    assert sum(isinstance(m, nn.GELU) for m in connector.modules()) == num_layers - 1
    if num_layers > 1:
        assert linears[0].out_features == 12 and linears[-1].in_features == 12
    check_grads(connector, out)


def test_mlp_with_one_layer_is_a_plain_linear_map():
    torch.manual_seed(0)
    connector = MLP(8, 16, num_layers=1)
    (linear,) = [m for m in connector.modules() if not isinstance(m, (MLP, nn.Sequential))]
    assert isinstance(linear, nn.Linear)
    tokens = torch.randn(2, 5, 8)
    torch.testing.assert_close(connector(tokens), F.linear(tokens, linear.weight, linear.bias))


def test_mlp_hidden_width_defaults_to_out_dim():
    connector = MLP(8, 16, num_layers=2)
    assert connector.net[0].out_features == 16


@pytest.mark.parametrize("num_layers", [0, -1])
def test_mlp_rejects_invalid_num_layers(num_layers):
    with pytest.raises(ValueError, match=rf"num_layers.*{num_layers}"):
        MLP(8, 16, num_layers=num_layers)


@pytest.mark.parametrize(("spec", "kind", "shape"), [
    ({"class_path": "mmlm.connectors.MLP", "init_args": {"num_layers": 3, "hidden_dim": 4}}, MLP, (2, 5, 16)),
    ({"class_path": "mmlm.connectors.LinearPrefix", "init_args": {"num_tokens": 4}}, LinearPrefix, (2, 4, 16)),
    ("mmlm.connectors.MLP", MLP, (2, 5, 16)),
])
def test_connector_builds_from_a_callable_argument(spec, kind, shape):
    """The ``Callable[[int, int], nn.Module]`` type Frozen's signature uses: in/out dims are given later."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--connector", type=Callable[[int, int], nn.Module])
    value = json.dumps(spec) if isinstance(spec, dict) else spec
    init = parser.instantiate_classes(parser.parse_args(["--connector", value]))
    connector = init.connector(8, 16)
    assert isinstance(connector, kind)
    assert connector(torch.randn(2, 5, 8)).shape == shape


def test_frozen_signature_injects_encoder_and_lm_widths_into_the_connector(shapes_data, tiny_gpt2, tiny_resnet):
    from mmlm.models import Frozen

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Frozen, "model")
    config = {"model": {
        "tokenizer": str(shapes_data / "tokenizer"),
        "encoder": {"class_path": "mmlm.encoders.TimmEncoder",
                    "init_args": {"name": "resnet10t", "img_size": 32, "model_kwargs": tiny_resnet}},
        "language_model": {"class_path": "mmlm.language.HFCausalLM", "init_args": {"config": tiny_gpt2}},
        "connector": {"class_path": "mmlm.connectors.MLP", "init_args": {"num_layers": 1}},
    }}
    model = parser.instantiate_classes(parser.parse_object(config)).model
    assert isinstance(model.connector, MLP)
    linear = model.connector.net[0]
    assert (linear.in_features, linear.out_features) == (model.encoder.width, model.language_model.width)
