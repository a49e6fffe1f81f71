"""Generation on a tensor- or expert-parallel model, as the trainer samples under tp/ep (every
rank runs it with the same seed), gives the single-process tokens; on 2 gloo ranks.

Under tensor parallelism each rank caches only its own K/V heads (the cache reads the sharded
``wk``); under expert parallelism the MoE layers keep their sorted path, whose all-to-all
every rank joins at every step (the few-token path applies only to plain experts).
"""

import pytest
import torch

from moe.inference import KVCache
from moe.inference.generate import generate
from moe.model import build_model
from moe.parallel.expert import apply_expert_parallel
from moe.parallel.tensor import apply_tensor_parallel
from tests.dist_utils import run_ranks
from tests.helpers import build_mesh, tiny_model_config

PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]


def tiny():
    return tiny_model_config(n_kv_heads=2, capacity_factor=None, eval_capacity_factor=None,
                             min_capacity=0, init_std=0.2, max_seq_len=24)


def reference():
    model = build_model(tiny(), seed=7).eval()
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    sampled = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=8, temperature=1.0,
                       top_k=10, generator=torch.Generator().manual_seed(0))
    return greedy, sampled.tolist()


def _run(rank, world_size):
    out = {}
    for kind in ("tp", "ep"):
        model = build_model(tiny(), seed=7).eval()
        if kind == "tp":
            apply_tensor_parallel(model, build_mesh(tp=world_size)["tp"])
            out["tp_kv_heads"] = KVCache(model, 1).k["0"].shape[1]
        else:
            apply_expert_parallel(model, build_mesh(ep=world_size)["ep"])
        greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
        sampled = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=8,
                           temperature=1.0, top_k=10,
                           generator=torch.Generator().manual_seed(0))
        out[kind] = (greedy, sampled.tolist())
    return out


@pytest.mark.slow
def test_tensor_and_expert_parallel_generation_equal_one_process():
    want = reference()
    for rank, got in enumerate(run_ranks(_run, 2)):
        assert got["tp_kv_heads"] == 1  # 2 KV heads over 2 ranks
        assert got["tp"] == want, f"tp rank {rank}"
        assert got["ep"] == want, f"ep rank {rank}"
