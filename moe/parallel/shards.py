"""How each parameter is sharded: the records tensor and expert parallelism write.

Every parameter carries a small record of how it is split (``shard_spec``), written by
``shard_param`` / ``mark_shard`` as tensor and expert parallelism apply the sharding plan
(moe/parallel/plan.py):
``{"tp": dim}`` / ``{"ep": dim}`` for tensor/expert sharding, plus ``tp_partial_grad`` for a
parameter replicated over tp whose gradient each tp rank only partly computes (the shared K/V
projections of multi-query attention). Gradient reduction, the gradient norm and checkpoints
all read these records, so they never need to know which module a parameter came from.
"""

from __future__ import annotations

import torch
from torch import nn


def shard_spec(p: torch.Tensor) -> dict:
    """How a parameter is split: {"tp": dim, "ep": dim, "tp_partial_grad": bool} (may be empty)."""
    return getattr(p, "_moe_shard", {})


def mark_shard(p: torch.Tensor, **spec) -> None:
    p._moe_shard = {**shard_spec(p), **spec}


def shard_slices(p: torch.Tensor) -> list[tuple[int, int, int]]:
    """How a local parameter was cut from the full one: [(dim, chunk index, chunks)], in the
    order the cuts were made (what ``moe.model.init`` needs to draw just this shard)."""
    return getattr(p, "_moe_slices", [])


def shard_param(module: nn.Module, name: str, mesh_dim: str, dim: int, rank: int,
                size: int) -> None:
    """Replace ``module.<name>`` by its ``rank``-th of ``size`` equal chunks along ``dim``.

    On the meta device (how the trainer builds) only the shape changes, and the cut is recorded
    (``shard_slices``) so that materialising draws exactly this chunk of the full parameter's
    values. A materialised parameter is sliced (its values are those of a single process).
    """
    full = getattr(module, name)
    if full.shape[dim] % size:
        raise ValueError(f"{name} of shape {tuple(full.shape)} does not split over "
                         f"{mesh_dim}={size} along dim {dim} (ParallelDims.validate names the "
                         f"config key to change)")
    local = full.detach().chunk(size, dim=dim)[rank].clone()
    param = nn.Parameter(local, requires_grad=full.requires_grad)
    mark_shard(param, **shard_spec(full), **{mesh_dim: dim})
    param._moe_slices = [*shard_slices(full), (dim, rank, size)]
    setattr(module, name, param)
