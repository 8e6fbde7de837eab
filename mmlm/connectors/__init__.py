"""Connectors: encoder tokens ``[B, N, Dv]`` → language-model embeddings ``[B, M, D]``."""

from mmlm.connectors.linear import MLP, LinearPrefix
from mmlm.connectors.qformer import (
    QFormer,
    QFormerAttention,
    QFormerConfig,
    QFormerConnector,
    QFormerEmbeddings,
    QFormerFeedForward,
    QFormerLayer,
    QFormerOutput,
)
from mmlm.connectors.resampler import Resampler, ResamplerAttention, ResamplerFeedForward, ResamplerLayer
from mmlm.connectors.state import ObjectTokens, StateTokens

__all__ = [
    "LinearPrefix",
    "MLP",
    "ObjectTokens",
    "QFormer",
    "QFormerAttention",
    "QFormerConfig",
    "QFormerConnector",
    "QFormerEmbeddings",
    "QFormerFeedForward",
    "QFormerLayer",
    "QFormerOutput",
    "Resampler",
    "ResamplerAttention",
    "ResamplerFeedForward",
    "ResamplerLayer",
    "StateTokens",
]
