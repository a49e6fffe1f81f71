"""Auxiliary-loss-free load balancing: the per-expert bias update (DeepSeek-V3, sec. 2.1.2).

Each MoE layer's router holds a bias b [E] (``router.expert_bias``, ``model.balance=bias``)
added to the scores for choosing the top-k only. After every optimizer step::

    b_i <- b_i + u * sign(mean_load - load_i)        u = model.bias_update_rate

where load_i is the number of (token, expert) assignments the router sent to expert i in the
step (before capacity dropping), summed over the WHOLE global batch (every micro-batch of every
data rank), and mean_load = sum_i load_i / E. An overloaded expert's bias falls by u, an
underloaded one's rises by u (sign(0) = 0: an expert exactly at the mean keeps its bias).
Source: Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(arXiv:2408.15664), used by DeepSeek-V3 (arXiv:2412.19437, "bias update speed" gamma = 0.001).

The loads come from the trainer's ``RoutingAccumulator`` after ``ShardedModel.reduce_step_metrics``
summed it over all ranks, so every rank of every layout sees the same integer counts and makes
the same update: the bias is replicated and never needs to be communicated. A rank updates only
the layers it holds (a pipeline rank without MoE layers updates nothing).
"""

from __future__ import annotations

import torch
from torch import nn


def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """The new bias: ``bias + rate * sign(mean(load) - load)``. load: [E] counts (any dtype)."""
    load = load.to(torch.float64)
    step = torch.sign(load.mean() - load)
    return bias + (rate * step).to(device=bias.device, dtype=bias.dtype)


@torch.no_grad()
def update_expert_biases(layers: dict[str, nn.Module], names: list[str],
                         tokens_per_expert: torch.Tensor) -> int:
    """Apply ``bias_update`` to every layer of ``layers`` (global layer key -> MoE) whose router
    has a bias, with its row of ``tokens_per_expert`` [n_moe_layers, E] (rows in ``names``
    order: the accumulator's). Returns how many layers were updated."""
    updated = 0
    for name, layer in layers.items():
        bias = getattr(layer.router, "expert_bias", None) if layer.router is not None else None
        if bias is None:
            continue
        bias.copy_(bias_update(bias, tokens_per_expert[names.index(name)], layer.bias_update_rate))
        updated += 1
    return updated
