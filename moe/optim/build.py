"""The one optimizer builder: AdamW, or ZeRO-1's AdamW over a mesh (``parallel.dp_shard``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moe.config import TrainConfig
from moe.optim.adamw import adamw_kwargs, param_groups
from moe.optim.zero import ZeroOneAdamW

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def build_optimizer(model: nn.Module | list[nn.Module], cfg: TrainConfig,
                    mesh: DeviceMesh | None = None, dp_shard: str = "none") -> torch.optim.AdamW:
    """The one optimizer builder: AdamW, or with ``dp_shard="zero1"`` and a mesh ZeRO-1's
    AdamW whose state is sharded over each parameter's data-parallel replicas
    (moe/optim/zero.py). Under ``"fsdp"`` plain AdamW: FSDP2's parameters are already shards."""
    if dp_shard == "zero1" and mesh is not None:
        return ZeroOneAdamW(model if isinstance(model, list) else [model], cfg, mesh)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_kwargs(cfg))
