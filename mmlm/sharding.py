"""FSDP2 for every family: torch's ``fully_shard`` applied in ``configure_model`` under Lightning's
``ModelParallelStrategy`` (``configs/strategies/fsdp2.yaml``), on GPUs over NCCL and on CPU ranks over gloo.

What is sharded, without a per-family list:

* every **block**: each element of an ``nn.ModuleList`` or ``nn.Sequential`` of two or more modules of one class
  that hold parameters (transformers' decoder layers, timm's and open_clip's ViT blocks, the Q-Former's and the
  Sub-LN decoder's layers, VLMO's experts), deepest first, so nested blocks are their own units;
* the **root**: the LightningModule itself takes every parameter no block holds (embeddings, heads, norms, the
  query tokens, small connectors).

Lightning calls ``training_step``/``validation_step``/``test_step``/``predict_step``, never the module's ``forward``,
and the families reach root parameters outside ``forward`` (``language_model.embed``, the target-only LM head,
``generate``); so those four hooks are registered as FSDP forward methods (``register_fsdp_forward_method``): the root's
parameters are gathered when a step starts and its gradients reduce-scattered after backward, as for ``forward``.

Mesh: Lightning's 2-D ``(data_parallel, tensor_parallel)`` device mesh is used as HSDP's ``(replicate, shard)``: with
the strategy's defaults (``data_parallel_size`` = nodes, ``tensor_parallel_size`` = devices per node) parameters are
sharded across the devices of a node and replicated across nodes; one node = plain FSDP (ZeRO-3). mmlm does no tensor
parallelism. Each rank reads its own data (``trainer.global_rank`` of ``trainer.world_size``), as under DDP, and the
sharded gradients are averaged over every rank.

A unit all-gathers its parameters in one dtype: keep parts that share a unit in one dtype (fp32, with
``precision: bf16-mixed`` for the compute), as under FSDP1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: The LightningModule hooks Lightning calls per batch; FSDP gathers the root's parameters around each.
ENTRY_POINTS = ("training_step", "validation_step", "test_step", "predict_step")


def depth(module: nn.Module, root: nn.Module) -> int:
    """How many dots the name of ``module`` inside ``root`` has (``root`` itself: 0)."""
    name = next(name for name, found in root.named_modules() if found is module)
    return name.count(".") + 1 if name else 0


def shard_units(root: nn.Module) -> list[nn.Module]:
    """The blocks of ``root`` (see the module docstring), deepest first (``fully_shard`` goes bottom-up)."""
    units: list[nn.Module] = []
    for container in root.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        items = list(container)
        if len({type(item) for item in items}) == 1 and all(any(True for _ in item.parameters()) for item in items):
            units.extend(item for item in items if not any(item is unit for unit in units))
    return sorted(units, key=lambda unit: -depth(unit, root))


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_(module: nn.Module, mesh: Any, mp_policy: Any = None) -> list[nn.Module]:
    """Apply FSDP2 to ``module`` (a LightningModule) in place over ``mesh`` (1-D: FSDP; 2-D: HSDP, replicate × shard):
    each block, then the root, whose per-batch hooks (:data:`ENTRY_POINTS`, those it has) become FSDP forward
    methods. Returns the blocks. A second call does nothing.

    Args:
        module: the model.
        mesh: the ``DeviceMesh`` (Lightning's ``LightningModule.device_mesh`` under ``ModelParallelStrategy``).
        mp_policy: ``torch.distributed.fsdp.MixedPrecisionPolicy`` or ``None`` (parameters as they are).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return []
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    units = shard_units(module)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for name in ENTRY_POINTS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return units



def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded ``module``, gathered to CPU on global rank 0 (``{}`` on the other ranks; a
    collective, so every rank calls it); ``None`` for a module that is not sharded (read its own ``state_dict``)."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
