"""Serving memory of a config on a tp x pp layout: how many sequences fit beside the weights,
and the bytes a generated token reads (the seeds' inference accounting for GPT-4).

Per GPU, from the same per-GPU layout the trainer's sharding gives (moe/accounting/layout.py):
weights ``weight_bytes`` per parameter of the most loaded GPU; KV cache per token of that
GPU's layers (with multi-query attention the one K/V head is replicated on every tp rank).
The largest batch at a context is ``floor((gpu_bytes - weights) / (kv_per_token * context))``;
activations and the allocator's slack are not counted, so it is an upper bound.

Bytes read per generated token, whole model, batch 1: every active parameter once
(``active_params * weight_bytes``: the 2 routed experts and everything dense) plus the KV
cache of the context (``kv_per_token * context``). At batch B the weights are shared by the B
tokens (if their experts overlap; at small batch they mostly do not) and the KV is per token.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from moe.accounting.layout import layout_accounting
from moe.accounting.params import count_params, kv_cache_bytes_per_token
from moe.config import Config


@dataclass(frozen=True)
class ServingMemory:
    tp: int
    pp: int
    context: int
    gpu_bytes: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_sequence_per_gpu: int
    max_batch: int  # sequences of ``context`` tokens beside the weights (0: weights do not fit)
    bytes_read_per_token: int  # whole model, batch 1: active weights + the context's KV

    def to_dict(self) -> dict:
        return asdict(self)


def serving_memory(cfg: Config, contexts=(8192, 32768), gpu_bytes=(40 * 10**9, 80 * 10**9),
                   tp: int = 8, pp: int = 16, weight_bytes: int = 2,
                   kv_bytes_per_element: int = 2) -> list[ServingMemory]:
    """One row per (context, GPU size) for the ``tp`` x ``pp`` layout of ``cfg``'s model."""
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp, c.parallel.dp, c.parallel.ep = tp, pp, 1, 1
    lay = layout_accounting(c, weight_bytes=weight_bytes, kv_bytes_per_element=kv_bytes_per_element)
    active = count_params(cfg.model).active_params * weight_bytes
    kv_model = kv_cache_bytes_per_token(cfg.model, kv_bytes_per_element)
    rows = []
    for n in contexts:
        per_seq = lay.kv_cache_bytes_per_token_per_gpu * n
        for g in gpu_bytes:
            free = g - lay.weight_bytes_per_gpu
            rows.append(ServingMemory(
                tp=tp, pp=pp, context=n, gpu_bytes=g, weight_bytes_per_gpu=lay.weight_bytes_per_gpu,
                kv_bytes_per_token_per_gpu=lay.kv_cache_bytes_per_token_per_gpu,
                kv_bytes_per_sequence_per_gpu=per_seq,
                max_batch=max(0, free // per_seq) if per_seq else 0,
                bytes_read_per_token=active + kv_model * n))
    return rows
