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

Collectives are bucketed: one flat buffer per (group, dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh

from moe.parallel.shards import shard_spec


def _params(parts: list[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for part in parts:
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


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
    params = [p for p in _params(parts) if p.grad is not None]
    if mesh["tp"].size() > 1:
        partial = [p.grad for p in params if shard_spec(p).get("tp_partial_grad")]
        if partial:
            _all_reduce_bucketed(partial, mesh["tp"].get_group())
    dense = [p.grad for p in params if "ep" not in shard_spec(p)]
    expert = [p.grad for p in params if "ep" in shard_spec(p)]
    if mesh["dp"].size() * mesh["ep"].size() > 1 and dense:
        _all_reduce_bucketed(dense, data_group(mesh))
    if mesh["dp"].size() > 1 and expert:
        _all_reduce_bucketed(expert, mesh["dp"].get_group())


def data_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The process group of the dp x ep ranks sharing this rank's (pp, tp) coordinate
    (the flattened ``dp_ep`` dim ``ParallelDims.build_mesh`` makes)."""
    return mesh["dp_ep"].get_group()


def _counts_here(p: torch.Tensor, mesh: DeviceMesh | None) -> bool:
    """Whether this rank contributes ``p`` to a global sum over the (pp, ep, tp) ranks.

    A parameter is counted once: on every rank holding a distinct shard of it, and for a
    dimension over which it is replicated only on that dimension's coordinate 0.
    """
    spec = shard_spec(p)
    for dim in ("ep", "tp"):
        if dim not in spec and mesh[dim].get_local_rank() != 0:
            return False
    return True


def grad_norm(parts: list[nn.Module], mesh: DeviceMesh | None) -> torch.Tensor:
    """Global L2 norm of all gradients (after reduce_gradients), identical on every rank."""
    params = [p for p in _params(parts) if p.grad is not None]
    if mesh is not None:
        params = [p for p in params if _counts_here(p, mesh)]
    if params:
        sq = torch.stack([p.grad.detach().float().pow(2).sum() for p in params]).sum()
    else:
        device = next(iter(_params(parts))).device
        sq = torch.zeros((), device=device)
    if mesh is not None:
        # dp replicas hold identical gradients: sum over the other dimensions only.
        other = mesh["pp_ep_tp"]
        if other.size() > 1:
            dist.all_reduce(sq, group=other.get_group())
    return sq.sqrt()


def clip_gradients(parts: list[nn.Module], mesh: DeviceMesh | None,
                   max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0 disables) by the global norm; returns the norm before clipping."""
    norm = grad_norm(parts, mesh)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in _params(parts):
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
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
