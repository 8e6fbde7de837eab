"""PaLM-E's non-image encoders: state vectors → k LM tokens, per-object state vectors → object tokens.

Shape legend: S state items (one per ``<state>`` item in the batch), O objects, Ds/Do their
vector widths, k tokens per state, D language-model width.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlm.connectors.linear import MLP


class StateTokens(nn.Module):
    """A whole-scene state vector mapped by an MLP to ``k`` LM embeddings (PaLM-E's state-estimate input).

    ``[S, Ds]`` → MLP → ``[S, k·D]`` → ``[S, k, D]``.

    Args:
        in_dim: state vector width Ds.
        out_dim: language-model width D.
        num_tokens: k embeddings per state.
        num_layers: linear layers of the MLP (GELU between them).
        hidden_dim: width of its hidden layers (default: ``out_dim``).
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 2, num_layers: int = 2,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        self.num_tokens, self.out_dim = num_tokens, out_dim
        self.mlp = MLP(in_dim, num_tokens * out_dim, num_layers=num_layers, hidden_dim=hidden_dim or out_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states [S, Ds]`` → ``[S, k, D]``."""
        return self.mlp(states).view(states.shape[0], self.num_tokens, self.out_dim)


class ObjectTokens(nn.Module):
    """Each object's state vector mapped by a shared MLP to one LM embedding (object-centric tokens).

    ``[O, Do]`` → ``[O, 1, D]``: every object is its own item, so a sentence holds as many object
    tokens as its scene has objects.

    Args:
        in_dim: object vector width Do.
        out_dim: language-model width D.
        num_layers: linear layers of the MLP (GELU between them).
        hidden_dim: width of its hidden layers (default: ``out_dim``).
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, out_dim, num_layers=num_layers, hidden_dim=hidden_dim)

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        """``objects [O, Do]`` → ``[O, 1, D]``."""
        return self.mlp(objects).unsqueeze(1)
