"""Connectors: encoder tokens ``[B, N, Dv]`` → language-model embeddings ``[B, M, D]``."""

from mmlm.connectors.linear import MLP, LinearPrefix
from mmlm.connectors.qformer import QFormer, QFormerConnector, QFormerOutput
from mmlm.connectors.resampler import Resampler

__all__ = ["LinearPrefix", "MLP", "QFormer", "QFormerConnector", "QFormerOutput", "Resampler"]
