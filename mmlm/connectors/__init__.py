"""Connectors: encoder tokens ``[B, N, Dv]`` → language-model embeddings ``[B, M, D]``."""

from mmlm.connectors.linear import MLP, LinearPrefix

__all__ = ["LinearPrefix", "MLP"]
