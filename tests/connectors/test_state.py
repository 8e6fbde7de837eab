"""PaLM-E state connectors: shapes, per-item independence, finite grads, learnability, building from YAML."""

from __future__ import annotations

import torch
from jsonargparse import ArgumentParser
from torch import nn

from mmlm.connectors.state import ObjectTokens, StateTokens


def test_state_tokens_map_each_state_to_k_embeddings():
    torch.manual_seed(0)
    connector = StateTokens(6, 16, num_tokens=3, hidden_dim=12)
    states = torch.randn(4, 6)
    out = connector(states)
    assert out.shape == (4, 3, 16)
    torch.testing.assert_close(out[1:2], connector(states[1:2]))  # items do not see each other
    assert not torch.allclose(out[:, 0], out[:, 1])  # the k tokens differ
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in connector.parameters())
    linears = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [12, 48]


def test_object_tokens_give_one_embedding_per_object():
    torch.manual_seed(0)
    connector = ObjectTokens(5, 8, num_layers=1)
    objects = torch.randn(7, 5)
    out = connector(objects)
    assert out.shape == (7, 1, 8)
    (linear,) = [m for m in connector.modules() if isinstance(m, nn.Linear)]
    torch.testing.assert_close(out[:, 0], objects @ linear.weight.T + linear.bias)


def test_state_tokens_learn_a_state_to_token_map():
    torch.manual_seed(0)
    connector = StateTokens(4, 8, num_tokens=2, hidden_dim=32)
    states = torch.randn(32, 4)
    target = (states @ torch.randn(4, 16)).view(32, 2, 8)  # a linear function of the state
    optimizer = torch.optim.Adam(connector.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = (connector(states) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_connectors_build_as_callables_from_config():
    parser = ArgumentParser()
    parser.add_argument("--connector", type=object)
    cfg = parser.parse_object({"connector": {"class_path": "mmlm.connectors.state.ObjectTokens",
                                             "init_args": {"in_dim": 3, "out_dim": 4}}})
    built = parser.instantiate_classes(cfg).connector
    assert isinstance(built, ObjectTokens) and built(torch.randn(2, 3)).shape == (2, 1, 4)
