"""Activation checkpointing of a language model's blocks that works in eval mode too (frozen LMs).

transformers recomputes a checkpointed layer only when ``self.training`` is true, but a frozen LM stays in eval mode
through ``fit`` (:class:`mmlm.freezing.Freezable`) while gradients still flow through it to the visual prefix (or to
its LoRA adapters): ``gradient_checkpointing_enable()`` then saves nothing. torch's composable
``checkpoint(module)`` (the activation checkpointing FSDP2 pairs with) instead hooks each block's forward: only
the block's inputs are kept, its inside is recomputed in the backward pass, in either mode, without changing
parameter names or the module tree. Without gradients (generation) nothing is saved, so nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed._composable import checkpoint


def recompute_blocks(blocks: Iterable[nn.Module]) -> int:
    """Apply non-reentrant activation checkpointing to each block (once; already checkpointed blocks are left as
    they are); returns how many blocks are checkpointed."""
    count = 0
    for block in blocks:
        if not is_recomputed(block):
            checkpoint(block)
        count += 1
    return count


def is_recomputed(block: nn.Module) -> bool:
    """Whether ``block`` already has composable activation checkpointing."""
    return checkpoint.state(block) is not None


def hf_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers layers that support checkpointing (``GradientCheckpointingLayer``: every decoder
    and encoder block of transformers 5's LMs).

    Raises:
        ValueError: the model has none (naming its class).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(f"{b}.") for b in blocks):
            blocks[name] = module
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no GradientCheckpointingLayer blocks: grad_checkpointing "
                         "cannot find what to recompute")
    return list(blocks.values())
