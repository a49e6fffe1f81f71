"""Sharded initialisation: every layout and device starts from the weights of one process.

The trainer builds the model on the meta device, applies parallelism there, and each rank
materialises only its own shards, drawing each value from a generator seeded by (train.seed,
parameter name[, expert]) (moe/model/init.py). Checked here: the drawn values do not depend on
the order or the set of parameters a process holds; a shard drawn alone equals the slice of
the full parameter; and on 4 gloo ranks, the shards of tp2 x pp2 and dp2 x ep2 (built through
the trainer's ShardedModel) are exactly the single-process weights, and no rank allocates the full
model.
"""

import pytest
import torch

from moe.config import ModelConfig, load_config
from moe.model import build_model
from moe.model.init import _local_ranges, _take, materialize
from moe.parallel.shards import record, shard_param
from tests.dist_utils import run_ranks

MODEL = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=4",
         "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4",
         "--model.expert_hidden=64", "--model.ffn_hidden=48", "--model.moe_every=2",
         "--model.max_seq_len=16", "--data.seq_len=16", "--train.batch_size=8",
         "--train.micro_batch_size=4", "--train.seed=7"]
LAYOUTS = {"tp2_pp2": ["--parallel.tp=2", "--parallel.pp=2"],
           "dp2_ep2": ["--parallel.dp=2", "--parallel.ep=2"]}


def _cfg(extra=()):
    return load_config(None, MODEL + list(extra))


def test_same_seed_same_weights_any_device_path():
    cfg = _cfg()
    a = build_model(cfg.model, "cpu", seed=7)
    b = materialize(build_model(cfg.model, "meta"), "cpu", 7)
    c = build_model(cfg.model, "cpu", seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name
    # seed=None follows torch's global RNG, as torch.manual_seed users expect.
    torch.manual_seed(3)
    d = build_model(cfg.model)
    torch.manual_seed(3)
    e = build_model(cfg.model)
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), e.parameters()))


def test_values_depend_on_name_not_on_what_else_is_held():
    # A pipeline stage that holds layers 2-3 only draws the same values for them.
    cfg = _cfg()
    full = build_model(cfg.model, "cpu", seed=7)
    stage = build_model(cfg.model, "meta")
    for k in ("0", "1"):
        del stage.layers[k]
    stage.tok_embeddings = None
    materialize(stage, "cpu", 7)
    ref = dict(full.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, ref[name]), name


@pytest.mark.parametrize("cuts", [[("tp", 2, 1, 2)], [("ep", 0, 1, 2)],
                                  [("tp", 2, 0, 2), ("ep", 0, 1, 2)]])
def test_shard_drawn_alone_equals_slice_of_full(cuts):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_experts=4,
                      expert_hidden=32, max_seq_len=16)
    full = build_model(cfg, "cpu", seed=5)
    meta = build_model(cfg, "meta")
    name = "layers.1.feed_forward.experts.w1"
    for mesh_dim, dim, rank, size in cuts:
        shard_param(meta, name, mesh_dim, dim, rank, size)
    assert meta.get_parameter(name).is_meta
    materialize(meta, "cpu", 5, lambda n: record(meta, n).slices)
    w1 = full.layers["1"].feed_forward.experts.w1
    expect = w1
    for _, dim, rank, size in cuts:
        expect = expect.chunk(size, dim=dim)[rank]
    assert torch.equal(meta.layers["1"].feed_forward.experts.w1, expect)
    assert record(meta, name).slices == tuple(c[1:] for c in cuts)


def _rank_shards(rank, world_size, overrides):
    from moe.parallel.launch import init_distributed
    from moe.parallel.sharded_model import ShardedModel

    cfg = load_config(None, overrides)
    dims, _ = init_distributed(cfg)
    model = build_model(cfg.model, "meta")
    runtime = ShardedModel(cfg, model, dims, torch.device("cpu"))
    # numpy: pickled by value (tensors would travel as shared-memory handles, one fd each).
    return {name: (p.detach().numpy().copy(), record(part, name).slices)
            for part in runtime.parts for name, p in part.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_shards_are_one_process_weights(layout):
    overrides = MODEL + LAYOUTS[layout]
    ref = dict(build_model(_cfg().model, "cpu", seed=7).named_parameters())
    full_numel = sum(p.numel() for p in ref.values())
    seen = set()
    for shards in run_ranks(_rank_shards, 4, overrides):
        for name, (local, slices) in shards.items():
            local = torch.from_numpy(local)
            full_shape, ranges = _local_ranges(tuple(local.shape), slices)
            assert tuple(full_shape) == tuple(ref[name].shape), name
            assert torch.equal(local, _take(ref[name].detach(), ranges)), (layout, name)
            seen.add(name)
        assert sum(t.size for t, _ in shards.values()) < 0.75 * full_numel
    assert seen == set(ref)
