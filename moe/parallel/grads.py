"""Data parallelism: gradient reduction, the global gradient norm, and reduced metrics.

Every data rank (a (dp, ep) coordinate) backpropagates its own micro-batches with losses
already scaled by ``micro_sequences / global_batch`` (see moe/train/loop.py), so the global-batch
gradient is the SUM over data ranks:

- dense parameters (replicated over dp and ep) are summed over the dp x ep ranks;
- expert parameters (split over ep) are summed over dp only: the other ep ranks' tokens
  already reached them through the all-to-all's backward. Summing them over ep as well is
  the "2x expert gradient" bug reported against other frameworks;
- parameters replicated over tp whose gradient each tp rank only partly computes (the shared
  K/V of multi-query attention, ``tp_partial_grad``) are also summed over tp.

Under ``parallel.dp_shard=fsdp`` FSDP2 has already summed them over dp (x ep) in backward
(moe/parallel/fsdp.py): only the tp sum is left, on each rank's shard.

Collectives are bucketed: one flat buffer per (group, dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh

from moe.parallel.shards import ShardRecord, local_tensor, named_records


def _all_reduce_bucketed(tensors: list[torch.Tensor], group) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=group)
        for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(r)


def reduce_gradients(parts: list[nn.Module], mesh: DeviceMesh | None) -> None:
    """Sum gradients over the ranks that hold replicas of each parameter (see module doc)."""
    if mesh is None:
        return
    params = [(p, rec) for _, p, rec in named_records(parts) if p.grad is not None]
    if mesh["tp"].size() > 1:
        partial = [local_tensor(p.grad) for p, rec in params if rec.tp_partial_grad]
        if partial:
            _all_reduce_bucketed(partial, mesh["tp"].get_group())
    params = [(p, rec) for p, rec in params if rec.dp_dim is None]  # not FSDP's
    dense = [p.grad for p, rec in params if rec.ep_dim is None]
    expert = [p.grad for p, rec in params if rec.ep_dim is not None]
    if mesh["dp"].size() * mesh["ep"].size() > 1 and dense:
        _all_reduce_bucketed(dense, data_group(mesh))
    if mesh["dp"].size() > 1 and expert:
        _all_reduce_bucketed(expert, mesh["dp"].get_group())


def data_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of the dp x ep ranks sharing this rank's (pp, tp) coordinate
    (the flattened ``dp_ep`` dim ``ParallelDims.build_mesh`` makes)."""
    return mesh["dp_ep"].get_group()


def _counts_here(rec: ShardRecord, mesh: DeviceMesh) -> bool:
    """Whether this rank contributes a parameter to a sum over every rank.

    A parameter is counted once: on every rank holding a distinct shard of it, and for a
    dimension over which it is replicated only on that dimension's coordinate 0.
    """
    return all(rec.dim_on(dim) is not None or mesh[dim].get_local_rank() == 0
               for dim in ("dp", "ep", "tp"))


def grad_norm(parts: list[nn.Module], mesh: DeviceMesh | None) -> torch.Tensor:
    """Global L2 norm of all gradients (after reduce_gradients), identical on every rank.

    sqrt(sum over counted gradients g of sum(g.float()^2)). Not ``torch._foreach_norm`` (what
    torch's ``get_total_norm`` uses): one kernel instead of a pow and a sum per parameter, but on
    CPU its per-tensor norms were up to 5e-6 off in fp32 (the configs/ablate.yaml model's head
    gradient; this sum: 4e-8), for ~0.1 ms of a ~45 ms step."""
    params = [p for _, p, rec in named_records(parts)
              if p.grad is not None and (mesh is None or _counts_here(rec, mesh))]
    if params:
        sq = torch.stack([local_tensor(p.grad).detach().float().pow(2).sum()
                          for p in params]).sum()
    else:
        device = named_records(parts)[0][1].device
        sq = torch.zeros((), device=device)
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(sq)  # the mesh spans the world; each shard was counted on one rank
    return sq.sqrt()


def clip_gradients(parts: list[nn.Module], mesh: DeviceMesh | None,
                   max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0 disables) by the global norm; returns the norm before clipping.
    Every gradient is multiplied by the same fp32 factor, cast to its dtype (one foreach
    multiply per dtype)."""
    norm = grad_norm(parts, mesh)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for _, p, _ in named_records(parts):
            if p.grad is not None:
                g = local_tensor(p.grad)
                by_dtype.setdefault(g.dtype, []).append(g)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, scale.to(dtype))
    return norm


def reduce_metrics(values: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum a flat float tensor of per-rank metric contributions over the whole world.

    Tensor-parallel ranks compute identical values, so only tp coordinate 0 contributes; pp
    stages contribute their own layers (zeros elsewhere); data ranks contribute their share.
    """
    if mesh is None:
        return values
    if mesh["tp"].get_local_rank() != 0:
        values = torch.zeros_like(values)
    dist.all_reduce(values)
    return values
