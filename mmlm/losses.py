"""Training losses shared by every model family.

Holds the language-model losses (token cross-entropy ignoring ``-100``, next-token loss); the
contrastive (ITC, gathered with grad across ranks), matching (ITM with hard negatives) and masked
LM losses go here as well, so model files only compose them.

Shape legend: B batch, T text tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Label value that no loss counts (padding, prompts, image placeholders).
IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` over labels ``!= -100``.

    Computed in float32. With no target at all the loss is 0 (still attached to the graph), not NaN.
    """
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss: position ``t`` of ``logits [B, T, V]`` predicts ``labels [B, T]`` at ``t + 1``."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])
