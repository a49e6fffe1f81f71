"""The sharding plan (moe/parallel/plan.py) is the one source of every parameter's layout.

No processes: tensor and expert parallelism are applied on the meta device with stand-in 1-D
meshes, and each parameter's recorded shard must be what the plan says for its name.
"""

import fnmatch

import pytest
import torch

from moe.config import VisionConfig
from moe.model import build_model
from moe.parallel.expert import apply_expert_parallel
from moe.parallel.mesh import ParallelDims
from moe.parallel.plan import PARAMETER_PLAN, placement, rule_for
from moe.parallel.shards import REPLICATED, ShardRecord, record
from moe.parallel.tensor import apply_tensor_parallel
from moe.vision.model import build_vision_model
from tests.helpers import FakeMesh, tiny_model_config

VARIANTS = {
    "mqa_moe": dict(),
    "gqa_dense_and_moe": dict(n_kv_heads=2, moe_every=2),
    "dense_and_moe_gelu": dict(moe_every=2, activation="gelu"),
    "mha_tied": dict(n_kv_heads=4, tie_embeddings=True),
    "shared_experts_bias": dict(n_shared_experts=2, shared_expert_hidden=16, balance="bias",
                                router_score="sigmoid"),
    # The imported families' options (moe/hf/import_hf.py): Qwen2-MoE, Qwen3-MoE.
    "qwen2_moe": dict(qkv_bias=True, n_shared_experts=1, shared_expert_gate=True,
                      n_kv_heads=2, dense_layers=[0]),
    "qwen3_moe_mqa": dict(qk_norm="head"),
}


def test_every_parameter_has_a_rule_and_every_rule_a_parameter():
    names = set()
    for kw in VARIANTS.values():
        names |= {n for n, _ in build_model(tiny_model_config(**kw), "meta").named_parameters()}
    vision = build_vision_model(tiny_model_config(), VisionConfig(enabled=True), "meta")
    names |= {n for n, _ in vision.named_parameters()}
    for name in names:
        rule_for(name)  # raises on a name the plan does not cover
    for pattern, _ in PARAMETER_PLAN:  # no stale entry
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern


def test_whole_projection_qk_norm_is_refused_under_tensor_parallelism():
    from moe.config import Config, ConfigError

    cfg = Config(model=tiny_model_config(qk_norm="projection"))
    ParallelDims(dp=2).validate(cfg, 2)  # dp, pp and ep leave every head on each rank
    with pytest.raises(ConfigError, match="model.qk_norm=projection .* parallel.tp=2"):
        ParallelDims(tp=2).validate(cfg, 2)


def test_unknown_parameter_is_refused_by_name():
    with pytest.raises(KeyError, match="layers.0.vision.proj.weight.*moe/parallel/plan.py"):
        rule_for("layers.0.vision.proj.weight")


def test_placements_by_hand():
    mqa = tiny_model_config(n_kv_heads=1)  # 4 heads of 8
    gqa = tiny_model_config(n_kv_heads=2)
    assert placement("layers.0.attention.wq.weight", mqa, 2).tp_dim == 0
    assert placement("layers.0.attention.wq.weight", mqa, 2).tp_unit == 8  # a whole head
    mqa_k = placement("layers.0.attention.wk.weight", mqa, 2)
    assert mqa_k.tp_dim is None and mqa_k.tp_partial_grad  # replicated, gradient summed
    assert not placement("layers.0.attention.wk.weight", mqa, 1).tp_partial_grad
    assert placement("layers.0.attention.wv.weight", gqa, 2).tp_dim == 0
    assert placement("layers.1.feed_forward.experts.w2", mqa, 2).tp_dim == 1
    assert placement("layers.1.feed_forward.experts.w2", mqa, 2).ep_dim == 0
    assert placement("layers.0.feed_forward.router.gate.weight", mqa, 2) == placement(
        "norm.weight", mqa, 2)  # replicated
    # model.qk_norm=head: one [head_dim] weight each rank applies to its own heads.
    q_norm = placement("layers.0.attention.q_norm.weight", gqa, 2)
    assert q_norm.tp_dim is None and q_norm.tp_partial_grad
    assert placement("layers.0.attention.wk.bias", gqa, 2).tp_unit == 8  # whole KV heads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2)])
def test_applied_shards_are_the_plans(variant, tp, ep):
    cfg = tiny_model_config(**VARIANTS[variant])
    full = {n: tuple(p.shape) for n, p in build_model(cfg, "meta").named_parameters()}
    model = build_model(cfg, "meta")
    apply_tensor_parallel(model, FakeMesh(tp, tp - 1))
    apply_expert_parallel(model, FakeMesh(ep, 0))
    for name, p in model.named_parameters():
        want = placement(name, cfg, tp)
        rec = record(model, name)
        assert rec.tp_dim == (want.tp_dim if tp > 1 else None), name
        assert rec.ep_dim == (want.ep_dim if ep > 1 else None), name
        assert rec.tp_partial_grad == want.tp_partial_grad, name
        # The shape the plan says (not the one the recorded cuts say), and the cuts name
        # this rank's chunk (tp rank tp - 1, ep rank 0).
        shape, cuts = list(full[name]), []
        for size, dim, rank in ((tp, want.tp_dim, tp - 1), (ep, want.ep_dim, 0)):
            if size > 1 and dim is not None:
                shape[dim] //= size
                cuts.append((dim, rank, size))
        assert tuple(p.shape) == tuple(shape), name
        assert rec.slices == tuple(cuts), name
        assert p.is_meta, name  # nothing was allocated
    assert all(b.is_meta for b in model.buffers())


def test_fsdp_cuts_a_dim_that_tensor_and_expert_parallelism_leave_whole():
    from moe.parallel.fsdp import shard_dim

    assert shard_dim("wq", (16, 32), ShardRecord(tp_dim=0), 2) == 1
    assert shard_dim("experts.w1", (2, 32, 16), ShardRecord(tp_dim=2, ep_dim=0), 2) == 1
    assert shard_dim("norm", (32,), REPLICATED, 4) == 0
    assert shard_dim("router.gate", (3, 32), REPLICATED, 2) == 1  # the first dim 2 divides
    with pytest.raises(ValueError, match="attn_gate of local shape .1,. has no dim.*"
                                         "parallel.dp_shard=fsdp"):
        shard_dim("attn_gate", (1,), REPLICATED, 2)


def test_single_process_has_no_mesh():
    dims = ParallelDims()
    assert dims.mesh() is None and dims.mesh("tp") is None
    assert dims == ParallelDims(tp=1)  # the mesh is not part of the sizes
    with pytest.raises(ValueError, match="needs a device mesh"):
        from moe.config import Config
        from moe.parallel.parallelize import parallelize

        parallelize(torch.nn.Linear(1, 1), ParallelDims(tp=2), Config())
