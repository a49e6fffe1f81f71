"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): split each block's matmuls over tp ranks.

``apply_tensor_parallel(model, tp_mesh)`` slices the full parameters (built identically on every
rank with the same seed) into local shards in place and adds the two communication operators of
the Megatron paper (sec. 3, fig. 3) as module hooks, so the model code is unchanged:

    f = CopyToTensorParallel      identity forward, all-reduce of the gradient in backward;
                                  on the INPUT of each column-parallel region
    g = ReduceFromTensorParallel  all-reduce forward, identity backward;
                                  on the OUTPUT of each row-parallel region

What is split how, and where f and g go, is declared once in ``moe/parallel/plan.py`` (the
sharding plan): every parameter with a tp dim there is cut into tp contiguous chunks along it
(rank r keeps chunk r), MQA's shared K/V is marked ``tp_partial_grad`` (its gradient is summed
over tp by ``moe.parallel.grads.reduce_gradients``), and f / g are hooks on the plan's regions:

    f: pre-hook on ``layer.attention`` (its input x), on ``feed_forward.experts`` (the
       expert-sorted tokens x_sorted [M, dim]) and on a dense ``feed_forward``.
    g: hook on ``attention.wo`` (its output), on ``feed_forward.experts`` (y_sorted [M, dim],
       before the MoE combine) and on a dense ``feed_forward``.

With contiguous chunks rank r holds query heads [r*H/tp, (r+1)*H/tp) and KV heads
[r*Hkv/tp, ...); query head h uses KV head h // (H/Hkv), so each rank's query heads are exactly
the groups of its own KV heads (SDPA enable_gqa maps them locally).

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
parallel layout alike through the shard records (moe/parallel/shards.py). Mixing DTensor
and plain parameters breaks ``clip_grad_norm_`` on torch 2.13 ("got mixed torch.Tensor and
DTensor"), multi-query attention's replicated-but-partial K/V has no Colwise/RowwiseParallel
style, and the MoE's ragged expert layout (3-D weights run on expert-sorted rows of varying
count) fits neither.

Composes with pipeline pruning (missing layers, tok_embeddings / norm / output None) and with
expert parallelism applied afterwards: EP wraps ``experts``' forward in an all-to-all token
exchange; our hooks sit around the whole call, so f acts on the tokens before dispatch and g
on the combined output, which is correct because both the exchange and the reduction are
linear.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moe.parallel.plan import placement, tp_regions
from moe.parallel.shards import mark, record, shard_param


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
    """Forward pre-hook applying f to the module's first input (positional or ``x=``), and to
    a ``scale=`` keyword when given: the MoE's combine weights folded into the experts' hidden
    activation (moe/model/experts.py), whose gradient each rank computes from its own hidden
    units only, as x's."""

    def hook(module, args, kwargs):
        if kwargs.get("scale") is not None:
            kwargs = {**kwargs, "scale": CopyToTensorParallel.apply(kwargs["scale"], group)}
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


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh | None) -> nn.Module:
    """Shard ``model`` (a ``Transformer`` or a pipeline stage of one) in place over the 1-D
    mesh ``tp_mesh`` by the sharding plan; see the module doc.

    A no-op when ``tp_mesh`` is None or of size 1. Sizes are checked by
    ``ParallelDims.validate``; a dim that still does not split raises in ``shard_param``.
    Returns the model for chaining.
    """
    if tp_mesh is None or tp_mesh.size() == 1:
        return model
    tp, rank, group = tp_mesh.size(), tp_mesh.get_local_rank(), tp_mesh.get_group()
    for name, _ in list(model.named_parameters()):
        if record(model, name).tp_dim is not None:
            raise RuntimeError(f"{name}: tensor parallelism is already applied")
        where = placement(name, model.cfg, tp)
        if where.tp_dim is not None:
            shard_param(model, name, "tp", where.tp_dim, rank, tp)
        elif where.tp_partial_grad:
            mark(model, name, tp_partial_grad=True)
    for name, module in model.named_modules():
        region = tp_regions(name, module)
        if region is None:
            continue
        if region.f_input:  # experts: forward(x, counts, capacity[, scale=]): f on x, scale
            module.register_forward_pre_hook(_f_pre_hook(group), with_kwargs=True)
        if region.g_output:
            module.register_forward_hook(_g_hook(group))
    return model
