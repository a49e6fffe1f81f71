"""How this rank's copy of each parameter was cut from the full one: one record per parameter name.

Tensor and expert parallelism apply the sharding plan (moe/parallel/plan.py) by cutting
parameters with ``shard_param``; each cut is written into a ``ShardRecord`` kept in a table on
the model part, keyed by the parameter's full name (module names are an API, and a name
survives what replaces parameter objects: ``to_empty``, FSDP2's ``fully_shard``). Every reader
asks the same two functions, so none needs to know which module a parameter came from:

    record(part, name)          the ShardRecord of one parameter (replicated if never cut)
    named_records(parts)        (name, parameter, record) for each parameter once

    materialisation  (moe/model/init.py)         record.slices: draw exactly this chunk
    gradient reduction, grad norm (grads.py)     record.ep_dim, tp_partial_grad, dim_on
    ZeRO-1           (moe/optim/zero.py)         record.ep_dim: which replicas own the state
    checkpoints      (moe/checkpoint/sharding.py) record.dim_on(mesh dim): DTensor placements

Under ``parallel.dp_shard=fsdp`` (moe/parallel/fsdp.py) parameters, gradients and AdamW state
are FSDP2's DTensors; ``local_tensor`` gives the shard a reader works on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

Slices = tuple[tuple[int, int, int], ...]  # (dim, chunk index, number of chunks), outermost first


@dataclass(frozen=True)
class ShardRecord:
    """How one local parameter relates to the full one.

    ``tp_dim`` / ``ep_dim``: the dim cut over tensor / expert-parallel ranks (None: replicated
    over them). ``tp_partial_grad``: replicated over tp, but each tp rank computes only part of
    its gradient (multi-query attention's shared K/V), so the gradient is summed over tp.
    ``slices``: the cuts in the order they were made (by tp and ep, on the meta device).
    ``dp_dim``: the dim FSDP2 cuts over the data ranks that replicate the parameter (dp, and
    ep too for one that ``ep_dim`` does not split), or None."""

    tp_dim: int | None = None
    ep_dim: int | None = None
    tp_partial_grad: bool = False
    slices: Slices = ()
    dp_dim: int | None = None

    def dim_on(self, mesh_dim: str) -> int | None:
        """The tensor dim split over mesh dimension ``mesh_dim`` ("dp", "ep", "tp"), or None."""
        if mesh_dim == "ep" and self.ep_dim is None:
            return self.dp_dim
        return {"tp": self.tp_dim, "ep": self.ep_dim, "dp": self.dp_dim}.get(mesh_dim)

    @property
    def sharded(self) -> bool:
        return bool(self.slices) or self.dp_dim is not None


REPLICATED = ShardRecord()
_TABLE = "shard_records"  # the attribute of a model part holding {name: ShardRecord}


def records(part: nn.Module) -> dict[str, ShardRecord]:
    """The part's table of records, keyed by parameter name (created empty on first use)."""
    if _TABLE not in part.__dict__:
        part.__dict__[_TABLE] = {}
    return part.__dict__[_TABLE]


def record(part: nn.Module, name: str) -> ShardRecord:
    """The record of ``part``'s parameter ``name``; ``REPLICATED`` if it was never cut."""
    return part.__dict__.get(_TABLE, {}).get(name, REPLICATED)


def named_records(parts: nn.Module | list[nn.Module],
                  ) -> list[tuple[str, nn.Parameter, ShardRecord]]:
    """(name, parameter, record) of every parameter of ``parts`` once (a tied one: first name)."""
    seen, out = set(), []
    for part in [parts] if isinstance(parts, nn.Module) else parts:
        for name, p in part.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p, record(part, name)))
    return out


def local_tensor(t):
    """This rank's shard of a DTensor (FSDP2's parameters, gradients, AdamW state), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def mark(part: nn.Module, name: str, **changes) -> None:
    """Update the record of ``part``'s parameter ``name`` (e.g. ``tp_partial_grad=True``)."""
    records(part)[name] = replace(record(part, name), **changes)


def shard_param(part: nn.Module, name: str, mesh_dim: str, dim: int, rank: int,
                size: int) -> None:
    """Replace ``part``'s parameter ``name`` by its ``rank``-th of ``size`` equal chunks along
    ``dim``, and record the cut (``mesh_dim``: "tp" or "ep").

    On the meta device (how the trainer builds) only the shape changes, and the recorded
    slices let materialising draw exactly this chunk of the full parameter's values. A
    materialised parameter is sliced (its values are those of a single process).
    """
    module_name, _, attr = name.rpartition(".")
    module = part.get_submodule(module_name)
    full: torch.Tensor = getattr(module, attr)
    if full.shape[dim] % size:
        raise ValueError(f"{name} of shape {tuple(full.shape)} does not split over "
                         f"{mesh_dim}={size} along dim {dim} (ParallelDims.validate names the "
                         f"config key to change)")
    local = full.detach().chunk(size, dim=dim)[rank].clone()
    setattr(module, attr, nn.Parameter(local, requires_grad=full.requires_grad))
    old = record(part, name)
    mark(part, name, **{f"{mesh_dim}_dim": dim}, slices=(*old.slices, (dim, rank, size)))
