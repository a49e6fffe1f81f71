"""``parallelize(model, dims, cfg, device)``: every kind of parallelism, applied in one place.

The model is built on the meta device (shapes only) on every rank; parallelism is applied from
outside, in a fixed order, and logged once (rank 0):

    1. pipeline    keep this rank's stages: pruned copies of the model (moe/parallel/pipeline.py)
    2. tensor      cut over tp what the sharding plan says, insert Megatron's f / g (tensor.py)
    3. expert      cut experts over ep, all-to-all token exchange (expert.py)
    4. materialise this rank's shards on its device, each value drawn from a generator seeded
                   by (train.seed, parameter name): the weights of one process, any layout
    5. activation  checkpointing of the blocks (train.activation_checkpointing)
    6. data        gradients summed over the dp x ep data ranks after backward (grads.py), by
                   the trainer's ``reduce_gradients``; with ``parallel.dp_shard=fsdp``, FSDP2's
                   ``fully_shard`` on each experts module, block and part instead (fsdp.py)

One process is the same call with every size 1 (only 4 and 5 do anything). The optimizer for
the parts is ``moe.optim.build_optimizer(parts, cfg.train, dims.mesh(), cfg.parallel.dp_shard)``.
(``train.compile`` compiles the forward after this, in ``ShardedModel.compile``; it is refused
with fsdp.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from moe.config import Config
from moe.model.init import materialize
from moe.parallel.activation_checkpoint import apply_activation_checkpointing
from moe.parallel.mesh import ParallelDims
from moe.parallel.shards import record


@dataclass
class Parallelized:
    """This rank's model parts and what was done. ``stage_ids``: the pipeline stage of each
    part ([0] without a pipeline); ``steps``: the log lines, in order."""

    parts: list[nn.Module]
    stage_ids: list[int]
    steps: list[str] = field(default_factory=list)


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Config,
                device: torch.device | str = "cpu", log: bool = True) -> Parallelized:
    """Apply ``dims``' layout to ``model`` (a meta or built ``Transformer``); see module doc.

    ``dims.mesh()`` must be built unless every size is 1. A built model is moved to ``device``
    as is (its values kept); a meta one is materialised from ``cfg.train.seed``.
    """
    mesh = dims.mesh()
    if mesh is None and dims.world_size != 1:
        raise ValueError(f"{dims.describe()} needs a device mesh: call dims.build_mesh() "
                         f"under torchrun first")
    steps: list[str] = []
    parts, stage_ids = [model], [0]
    if dims.pp > 1:
        from moe.parallel.pipeline import build_stage_models

        staged = build_stage_models(model, dims.mesh("pp").get_local_rank(), dims.pp, cfg)
        stage_ids, parts = [s for s, _ in staged], [m for _, m in staged]
        steps.append(f"pipeline: stages {stage_ids} of {dims.pp} ranks "
                     f"({cfg.parallel.pp_schedule})")
    if dims.tp > 1:
        from moe.parallel.tensor import apply_tensor_parallel

        for part in parts:
            apply_tensor_parallel(part, dims.mesh("tp"))
        steps.append(f"tensor: tp={dims.tp}")
    if dims.ep > 1:
        from moe.parallel.expert import apply_expert_parallel

        for part in parts:
            apply_expert_parallel(part, dims.mesh("ep"))
        steps.append(f"expert: ep={dims.ep}")
    for part in parts:
        if any(p.is_meta for p in part.parameters()):
            materialize(part, device, cfg.train.seed,
                        lambda name, part=part: record(part, name).slices)
        else:
            part.to(device)
    steps.append(f"materialise on {device} (seed {cfg.train.seed})")
    apply_activation_checkpointing(parts, cfg.train.activation_checkpointing)
    if cfg.train.activation_checkpointing != "none":
        steps.append(f"activation checkpointing: {cfg.train.activation_checkpointing}")
    if mesh is not None and cfg.parallel.dp_shard == "fsdp":
        from moe.parallel.fsdp import apply_fsdp

        for part in parts:
            apply_fsdp(part, mesh)
        steps.append(f"data: FSDP2 over dp x ep = {dims.data_shards} ranks (experts: dp = "
                     f"{dims.dp})")
    elif mesh is not None:
        steps.append(f"data: gradients summed over dp x ep = {dims.data_shards} ranks")
    if mesh is not None and log and torch.distributed.get_rank() == 0:
        print(f"parallelize ({dims.describe()}): " + "; ".join(steps), file=sys.stderr)
    return Parallelized(parts, stage_ids, steps)
