"""Connectors that map encoder tokens ``[B, N, Dv]`` to language-model embeddings ``[B, M, D]``."""

from __future__ import annotations

import torch
from torch import nn


class LinearPrefix(nn.Module):
    """Frozen's visual prefix: pool the image tokens, then one linear map to ``k`` LM embeddings.

    ``[B, N, Dv]`` → mean over N → ``[B, Dv]`` → Linear(Dv, k·D) → ``[B, k, D]``.

    Args:
        in_dim: encoder width Dv.
        out_dim: language-model width D.
        num_tokens: k prefix tokens (the paper uses 2).
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 2) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, num_tokens * out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, N, Dv]`` → ``prefix [B, k, D]``."""
        pooled = tokens.mean(dim=1)
        return self.proj(pooled).view(tokens.shape[0], self.num_tokens, self.out_dim)


class MLP(nn.Module):
    """Per-token projection: one output embedding per image token (PaLM-E / LLaVA style).

    ``[B, N, Dv]`` → ``[B, N, D]``. ``num_layers=1`` is a plain linear map; more layers put GELU
    between hidden layers of width ``hidden_dim`` (default: ``out_dim``).

    Args:
        in_dim: encoder width Dv.
        out_dim: language-model width D.
        num_layers: number of linear layers.
        hidden_dim: width of the hidden layers.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP num_layers must be >= 1, got {num_layers}")
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, N, Dv]`` → ``[B, N, D]``."""
        return self.net(tokens)
