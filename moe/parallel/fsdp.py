"""FSDP2 on the data-parallel ranks (``parallel.dp_shard=fsdp``): every parameter, its gradient
and its AdamW state sharded over the ranks that replicate it, with torch's ``fully_shard``.

    apply_fsdp(part, mesh)   # last in parallelize: after tp, ep, materialisation, checkpointing

Which ranks replicate a parameter is what data parallelism already knows (moe/parallel/grads.py):
dense parameters are replicated over the dp x ep data ranks (mesh ``"dp_ep"``), expert
parameters (split over ep) over the dp ranks only. So each expert-parallel experts module is
its own FSDP unit on mesh ``"dp"`` (torchtitan's expert-data-parallel mesh), each block a unit
on ``"dp_ep"``, and the part itself one more (embedding, final norm, head). A unit's parameters
are gathered just before its forward and resharded after it, and again for backward, where
its gradients are reduce-scattered: each rank ends the step with its shard of the summed
gradient, updates its shard of the parameter, and keeps AdamW state for that shard only.

Each parameter is cut along a dim that tensor and expert parallelism left whole, the first one
its unit's ranks divide (``shard_placement_fn``); the dim is written into its ``ShardRecord``
(``dp_dim``). So a checkpoint places it as ``Shard(dp_dim)`` over dp (and ep for a dense one)
beside its tp / ep ``Shard``s, and it reshards to and from every other layout (moe/checkpoint/).
Two mesh dims never cut the same tensor dim in different orders, and no padding occurs.

Gradients are SUMMED over data ranks, as everywhere here (each micro-batch's loss is already
scaled by its share of the global batch): a divide factor of 1, and sum reduction forced,
since gloo has no PREMUL_SUM (``Cannot use ReduceOp.PREMUL_SUM with Gloo``). Every unit,
the part included, reshards after forward, so parameters are sharded whenever the trainer
reads them (a checkpoint after an evaluation). A parameter replicated over tp with a partial
gradient (MQA's K/V) is still summed over tp afterwards, shard by shard (``reduce_gradients``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

from moe.parallel.shards import ShardRecord, mark, named_records


def shard_dim(name: str, shape: tuple[int, ...], rec: ShardRecord, n: int) -> int:
    """The dim FSDP cuts parameter ``name`` along over ``n`` ranks: the first one tp and ep
    left whole whose size ``n`` divides."""
    for d, size in enumerate(shape):
        if d not in (rec.tp_dim, rec.ep_dim) and size % n == 0:
            return d
    raise ValueError(f"{name} of local shape {tuple(shape)} has no dim that tensor and expert "
                     f"parallelism leave whole and {n} data ranks divide: parallel.dp_shard=fsdp "
                     f"cannot shard it at this parallel.dp x parallel.ep")


def apply_fsdp(part: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard ``part`` (a model or a pipeline stage of one, materialised) with ``fully_shard``
    over the data ranks of ``mesh`` (the trainer's 4-D mesh); see the module doc."""
    dense, expert = mesh["dp_ep"], mesh["dp"]
    dims: dict[int, int] = {}
    experts: dict[str, nn.Module] = {}
    for name, p, rec in named_records(part):
        n = (expert if rec.ep_dim is not None else dense).size()
        dims[id(p)] = shard_dim(name, tuple(p.shape), rec, n)
        mark(part, name, dp_dim=dims[id(p)])
        if rec.ep_dim is not None:
            module_name = name.rpartition(".")[0]
            experts[module_name] = part.get_submodule(module_name)

    def shard(module: nn.Module, unit_mesh: DeviceMesh) -> None:
        fully_shard(module, mesh=unit_mesh, reshard_after_forward=True,
                    shard_placement_fn=lambda p: Shard(dims[id(p)]))
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)

    for module in experts.values():  # innermost first: a unit takes what no inner unit holds
        shard(module, expert)
    for block in part.layers.values():
        shard(block, dense)
    shard(part, dense)
    return part
