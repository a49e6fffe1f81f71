"""ZeRO stage 1: AdamW state sharded over the data-parallel replicas of each parameter.

The reports suggest GPT-4 was trained with ZeRO-1. Every parameter has one *owner* among the
ranks that hold a replica of it (dense parameters: the dp x ep data ranks; expert parameters:
the dp ranks, since experts are split over ep). Only the owner keeps its AdamW state (2 fp32
tensors of the parameter's size) and updates it; the new values are then broadcast to the
other replicas. Owners are chosen greedily by size, deterministically, so every rank agrees.

Gradients are still all-reduced in full (moe/parallel/grads.py); a reduce-scatter would halve
that traffic and is the obvious next step. Checkpoints save each state tensor from its owner
only (moe/checkpoint/ saves what ``optimizer.state`` holds), so a ZeRO-1 run can
resume on any layout, with or without ZeRO-1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.config import TrainConfig
from moe.optim.adamw import adamw_kwargs, param_groups
from moe.parallel.grads import data_group
from moe.parallel.shards import named_records


def assign_owners(params: list[nn.Parameter], n_ranks: int) -> list[int]:
    """Greedy balance by size: largest first, each to the least loaded rank (ties: lowest)."""
    load = [0] * n_ranks
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += params[i].numel()
    return owners


class ZeroOneAdamW(torch.optim.AdamW):
    """AdamW over the parameters this rank owns; ``step`` then broadcasts every parameter
    from its owner to its replicas."""

    def __init__(self, parts: list[nn.Module], cfg: TrainConfig, mesh):
        groups = param_groups(parts, cfg.weight_decay)
        is_expert = {id(p): rec.ep_dim is not None for _, p, rec in named_records(parts)}
        self.replica_sets = []  # (process group, [(param, owner global rank)])
        owned_ids = set()
        for kind in ("dense", "expert"):
            group = data_group(mesh) if kind == "dense" else mesh["dp"].get_group()
            params = [p for g in groups for p in g["params"]
                      if is_expert[id(p)] == (kind == "expert")]
            size, me = dist.get_world_size(group), dist.get_rank(group)
            owners = assign_owners(params, size)
            self.replica_sets.append(
                (group, [(p, dist.get_global_rank(group, o)) for p, o in zip(params, owners)]))
            owned_ids.update(id(p) for p, o in zip(params, owners) if o == me)
        local = [{**g, "params": [p for p in g["params"] if id(p) in owned_ids]} for g in groups]
        super().__init__(local, **adamw_kwargs(cfg))
        self.all_params = [p for g in groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group, members in self.replica_sets:
            if dist.get_world_size(group) == 1:
                continue
            by_owner: dict[tuple, list[torch.Tensor]] = {}
            for p, owner in members:
                by_owner.setdefault((owner, str(p.dtype)), []).append(p.data)
            for (owner, _), tensors in sorted(by_owner.items()):
                flat = _flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=owner, group=group)
                for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    t.copy_(v)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self.all_params:  # non-owned parameters have gradients too
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
