"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): split each block's matmuls over tp ranks.

``apply_tensor_parallel(model, tp_mesh)`` slices the full parameters (built identically on every
rank with the same seed) into local shards in place and adds the two communication operators of
the Megatron paper (sec. 3, fig. 3) as module hooks, so the model code is unchanged:

    f = CopyToTensorParallel      identity forward, all-reduce of the gradient in backward;
                                  on the INPUT of each column-parallel region
    g = ReduceFromTensorParallel  all-reduce forward, identity backward;
                                  on the OUTPUT of each row-parallel region

What is split how (tp ranks r = 0..tp-1, contiguous chunks):

    attention.wq.weight   [H*D, dim]      dim 0: whole query heads, H/tp per rank
    attention.wk/wv       [Hkv*D, dim]    dim 0 (whole KV heads) when Hkv % tp == 0: rank r's
                                          query heads are exactly the groups of its KV heads;
                                          Hkv == 1 (multi-query): replicated, and each rank's
                                          gradient is partial (from its query heads only), so
                                          they are marked ``tp_partial_grad`` and summed over tp
                                          by ``sync_partial_grads``
    attention.wo.weight   [dim, H*D]      dim 1 (row-parallel)
    experts.w1/w3         [E, dim, hid]   dim 2: every expert's hidden units split over tp
    experts.w2            [E, hid, dim]   dim 1
    dense w1/w3.weight    [hid, dim]      dim 0;   dense w2.weight [dim, hid]: dim 1
    router, norms, tok_embeddings, output: replicated

    f: pre-hook on ``layer.attention`` (its input x), on ``feed_forward.experts`` (the
       expert-sorted tokens x_sorted [M, dim]) and on a dense ``feed_forward``.
    g: hook on ``attention.wo`` (its output), on ``feed_forward.experts`` (y_sorted [M, dim],
       before the MoE combine) and on a dense ``feed_forward``.

Between f and g every rank holds the same activations; only the column-parallel matmul outputs
and the row-parallel partial sums are local. The router stays OUTSIDE f: its input and its use
in the combine (weights times the all-reduced expert output) are identical on every tp rank, so
its gradient, and its contribution to the input gradient, are already complete on each rank;
putting it behind f would count its input gradient tp times.

Embeddings, the LM head and the norms are replicated: simple and correct. Their inputs and the
gradients of their outputs are identical on every tp rank (the residual stream is), so their
gradients are identical too and need no tp communication. A vocab-parallel embedding and head
(Megatron's parallel cross-entropy) would save memory and head FLOPs for large vocabularies; it
is a possible later optimisation.

Why small autograd Functions and not DTensor ``parallelize_module``: parameters stay plain local
tensors so the optimizer, gradient reduction, grad-norm clipping and checkpoints treat every
parallel layout alike through the ``shard_spec`` records (moe/parallel/mesh.py). Mixing DTensor
and plain parameters breaks ``clip_grad_norm_`` (PLATFORM.md), multi-query attention's
replicated-but-partial K/V has no Colwise/RowwiseParallel style, and the MoE's ragged expert
layout (3-D weights run on expert-sorted rows of varying count) fits neither.

Composes with pipeline pruning (missing layers, tok_embeddings / norm / output None) and with
expert parallelism applied afterwards: EP wraps ``experts``' forward in an all-to-all token
exchange; our hooks sit around the whole call, so f acts on the tokens before dispatch and g
on the combined output, which is correct because both the exchange and the reduction are
linear.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.parallel.mesh import mark_shard, shard_param, shard_spec


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: identity in forward; all-reduce (sum) of the gradient over tp in backward.

    Sits at the input of a column-parallel region: every rank uses the full input, each
    computes only its shard's part of the input gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: all-reduce (sum) over tp in forward; identity in backward.

    Sits at the output of a row-parallel region: each rank holds a partial sum over its shard
    of the contraction dimension.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


# --- hooks ------------------------------------------------------------------------------------


def _f_pre_hook(group):
    """Forward pre-hook applying f to the module's first input (positional or ``x=``)."""

    def hook(module, args, kwargs):
        if args:
            return (CopyToTensorParallel.apply(args[0], group), *args[1:]), kwargs
        if "x" in kwargs:
            return args, {**kwargs, "x": CopyToTensorParallel.apply(kwargs["x"], group)}
        raise TypeError(f"{type(module).__name__}: tensor-parallel input hook found no input x")

    return hook


def _g_hook(group):
    """Forward hook applying g to the module's output tensor."""

    def hook(module, args, output):
        return ReduceFromTensorParallel.apply(output, group)

    return hook


# --- applying ---------------------------------------------------------------------------------


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard ``model`` in place over the 1-D mesh ``tp_mesh`` (e.g. ``mesh["tp"]``); see module doc.

    A no-op when ``tp_mesh`` is None or of size 1. Works on a pruned pipeline stage. Returns the
    model for chaining.
    """
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    tp, rank, group = tp_mesh.size(), tp_mesh.get_local_rank(), tp_mesh.get_group()

    for name, layer in model.layers.items():
        _shard_attention(layer.attention, f"layers.{name}.attention", rank, tp, group)
        ff = layer.feed_forward
        if hasattr(ff, "experts"):
            _shard_experts(ff.experts, f"layers.{name}.feed_forward.experts", rank, tp, group)
        else:
            _shard_dense(ff, f"layers.{name}.feed_forward", rank, tp, group)
    return model


def _shard_attention(attn: nn.Module, where: str, rank: int, tp: int, group) -> None:
    d = attn.head_dim
    n_heads, n_kv = attn.wq.weight.shape[0] // d, attn.wk.weight.shape[0] // d
    if "tp" in shard_spec(attn.wq.weight):
        raise RuntimeError(f"{where}: tensor parallelism is already applied")
    assert n_heads % tp == 0, (f"{where}: n_heads={n_heads} does not split over tp={tp}: "
                               f"model.n_heads must be divisible by parallel.tp")
    assert n_kv == 1 or n_kv % tp == 0, (
        f"{where}: n_kv_heads={n_kv} must be 1 (replicated K/V) or divisible by tp={tp}")
    shard_param(attn.wq, "weight", "tp", 0, rank, tp)
    shard_param(attn.wo, "weight", "tp", 1, rank, tp)
    if n_kv % tp == 0:
        # Contiguous chunks: rank r holds query heads [r*H/tp, (r+1)*H/tp) and KV heads
        # [r*Hkv/tp, ...); query head h uses KV head h // (H/Hkv), so each rank's query heads
        # are exactly the groups of its own KV heads (SDPA enable_gqa maps them locally).
        shard_param(attn.wk, "weight", "tp", 0, rank, tp)
        shard_param(attn.wv, "weight", "tp", 0, rank, tp)
    else:
        # Multi-query: the one K/V head serves every rank's query heads.
        mark_shard(attn.wk.weight, tp_partial_grad=True)
        mark_shard(attn.wv.weight, tp_partial_grad=True)
    attn.register_forward_pre_hook(_f_pre_hook(group), with_kwargs=True)
    attn.wo.register_forward_hook(_g_hook(group))


def _shard_experts(experts: nn.Module, where: str, rank: int, tp: int, group) -> None:
    hidden = experts.w1.shape[2]
    assert hidden % tp == 0, (f"{where}: expert hidden size {hidden} does not split over "
                              f"tp={tp}: model.expert_hidden must be divisible by parallel.tp")
    shard_param(experts, "w1", "tp", 2, rank, tp)
    if experts.w3 is not None:
        shard_param(experts, "w3", "tp", 2, rank, tp)
    shard_param(experts, "w2", "tp", 1, rank, tp)
    # Hooks see forward(x, counts, capacity): f on x only; g on the [M, dim] output.
    experts.register_forward_pre_hook(_f_pre_hook(group), with_kwargs=True)
    experts.register_forward_hook(_g_hook(group))


def _shard_dense(ff: nn.Module, where: str, rank: int, tp: int, group) -> None:
    hidden = ff.w1.weight.shape[0]
    assert hidden % tp == 0, (f"{where}: hidden size {hidden} does not split over tp={tp}: "
                              f"model.ffn_hidden must be divisible by parallel.tp")
    shard_param(ff.w1, "weight", "tp", 0, rank, tp)
    if ff.w3 is not None:
        shard_param(ff.w3, "weight", "tp", 0, rank, tp)
    shard_param(ff.w2, "weight", "tp", 1, rank, tp)
    ff.register_forward_pre_hook(_f_pre_hook(group), with_kwargs=True)
    ff.register_forward_hook(_g_hook(group))


def sync_partial_grads(model_parts: nn.Module | Iterable[nn.Module], tp_mesh) -> None:
    """Sum over tp the gradients of parameters marked ``tp_partial_grad`` (MQA's K/V).

    Call after backward (all micro-batches), before gradient clipping and the optimizer step.
    Parameters without a gradient are skipped (the same ones on every tp rank: the graphs are
    alike). One all-reduce per dtype. ``moe.parallel.data.reduce_gradients`` does the same sum
    when given the full mesh: a trainer calls one or the other, never both (twice doubles it).
    """
    if tp_mesh is None or tp_mesh.size() == 1:
        return
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    seen, grads = set(), {}
    for part in parts:
        for p in part.parameters():
            if id(p) in seen or p.grad is None or not shard_spec(p).get("tp_partial_grad"):
                continue
            seen.add(id(p))
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    for ts in grads.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=tp_mesh.get_group())
        for t, r in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(r)
