"""Pipeline parallelism: layer split, stage pruning, and parity of pp=2 with one process.

Each spawned run (2 gloo ranks) checks several configurations against a single-process
reference computed on every rank: the same global batch as the same micro-batches, loss =
sum over micro-batches of CE-mean * share, one backward each. Compared: the total loss, the
routing statistics summed over micro-batches, and every parameter gradient on the rank that
owns it (the router gates' include the injected aux / z-loss gradients).
"""

import pytest
import torch

from moe.config import Config, load_config
from moe.model.transformer import build_model
from moe.parallel.pipeline import build_stage_models, split_layers, stage_indices
from tests.dist_utils import run_ranks

SEQ, MB, N_MICRO = 8, 2, 4
LOCAL = MB * N_MICRO
GLOBAL = 2 * LOCAL  # as if dp = 2: shares are micro / global, not micro / local


def _cfg(schedule="1f1b", capacity_factor=1.0, pp_layers=None, pp=2, tp=1) -> Config:
    cfg = load_config(None, [
        "--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=4",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=8", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.max_seq_len=16", "--model.min_capacity=1",
        f"--model.capacity_factor={'null' if capacity_factor is None else capacity_factor}",
        "--model.aux_loss_coef=0.1", "--model.z_loss_coef=0.01", "--model.router_jitter=0",
        f"--data.seq_len={SEQ}", f"--train.batch_size={GLOBAL}",
        f"--train.micro_batch_size={MB}", f"--parallel.pp={pp}", f"--parallel.tp={tp}",
        f"--parallel.pp_schedule={schedule}", "--parallel.pp_stages_per_rank=2",
        f"--parallel.pp_microbatches={N_MICRO}"])
    cfg.parallel.pp_layers = pp_layers
    return cfg.validate()


# ---------------------------------------------------------------------------------------------
# Unit tests (no processes)


def test_split_layers_even_and_remainder_to_later_stages():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(5, 2) == [[0, 1], [2, 3, 4]]
    assert split_layers(10, 4) == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_layers(7, 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert split_layers(3, 1) == [[0, 1, 2]]


def test_split_layers_explicit():
    assert split_layers(4, 2, [1, 3]) == [[0], [1, 2, 3]]
    assert split_layers(6, 3, [3, 2, 1]) == [[0, 1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(4, 2, [1, 2])
    with pytest.raises(ValueError, match="pp_layers"):
        split_layers(4, 2, [4])
    with pytest.raises(ValueError, match="fewer"):
        split_layers(2, 3)


def test_stage_placement_is_loop():
    assert stage_indices(0, 2, 4) == [0, 2] and stage_indices(1, 2, 4) == [1, 3]
    assert stage_indices(1, 4, 4) == [1]


def test_build_stage_models_prunes_and_keeps_names():
    cfg = _cfg("interleaved_1f1b")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    full = dict(model.named_parameters())
    n_full = len(full)
    seen = {}
    for rank in range(2):
        parts = build_stage_models(model, rank, 2, cfg)
        assert [s for s, _ in parts] == [rank, rank + 2]
        for s, part in parts:
            assert list(part.layers.keys()) == [str(s)]
            assert (part.tok_embeddings is None) == (s != 0)
            assert (part.norm is None) == (s != 3) and (part.output is None) == (s != 3)
            for name, p in part.named_parameters():
                assert name not in seen, name
                seen[name] = p
                assert torch.equal(p, full[name]) and p is not full[name]  # a copy
    assert set(seen) == set(full)  # every parameter owned exactly once
    assert len(dict(model.named_parameters())) == n_full  # the model is untouched

    cfg = _cfg("1f1b", pp_layers=[1, 3])
    (s0, p0), = build_stage_models(model, 0, 2, cfg)
    (s1, p1), = build_stage_models(model, 1, 2, cfg)
    assert (s0, list(p0.layers.keys())) == (0, ["0"])
    assert (s1, list(p1.layers.keys())) == (1, ["1", "2", "3"])
    assert "layers.3.attention.wq.weight" in dict(p1.named_parameters())
    # A pruned stage runs on its own: stage 0 embeds ids, the last stage returns logits.
    x = torch.randint(0, 64, (MB, SEQ))
    with torch.no_grad():
        h = p0(x)
        assert h.shape == (MB, SEQ, 32)
        assert torch.allclose(p1(h), model(x), atol=1e-6)


def test_interleaved_needs_one_pp_layers_entry_per_virtual_stage():
    cfg = _cfg("interleaved_1f1b", pp_layers=[1, 3])  # 4 stages, 2 sizes
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="pp_layers"):
        build_stage_models(build_model(cfg.model), 0, 2, cfg)


# ---------------------------------------------------------------------------------------------
# Parity (spawned ranks)


def _reference(cfg, x, y):
    """One process: loss, summed routing stats per layer, gradients by name."""
    from moe.parallel.pipeline import lm_cross_entropy

    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    share = MB / GLOBAL
    model.set_loss_scale(share)
    total = 0.0
    stats = {}
    for xm, ym in zip(x.chunk(N_MICRO), y.chunk(N_MICRO)):
        loss = lm_cross_entropy(model(xm), ym) * share
        loss.backward()
        total += float(loss)
        for key, layer in model.layers.items():
            _add_stats(stats, key, layer.feed_forward.last_stats, share)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return total, stats, grads


def _add_stats(acc, name, st, share):
    a = acc.setdefault(name, {"tokens": 0, "kept": 0, "aux": 0.0, "z": 0.0, "calls": 0})
    a["tokens"] = a["tokens"] + st.tokens_per_expert
    a["kept"] = a["kept"] + st.kept_per_expert
    a["aux"] += share * float(st.aux_loss)
    a["z"] += share * float(st.z_loss)
    a["calls"] += 1


def _check_case(cfg, pp_mesh, x, y, tag):
    """Run one pipeline step of ``cfg`` and compare with the reference; returns a summary."""
    from moe.parallel.pipeline import PipelineRuntime

    ref_loss, ref_stats, ref_grads = _reference(cfg, x, y)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    pp_rank = pp_mesh.get_local_rank()
    stages = build_stage_models(model, pp_rank, 2, cfg)
    stats = {}
    pipe = PipelineRuntime(stages, pp_mesh, cfg, (MB, SEQ), N_MICRO, GLOBAL, "cpu",
                           on_moe_forward=lambda n, st, share: _add_stats(stats, n, st, share))
    for part in pipe.parts:
        part.train()
        part.zero_grad(set_to_none=True)
    loss = pipe.step(x, y)

    if pipe.is_last:
        assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (tag, float(loss), ref_loss)
    else:
        assert loss is None
    owned = [k for part in pipe.parts for k in part.layers.keys()]
    assert sorted(stats) == sorted(owned), (tag, stats.keys(), owned)
    for name, a in stats.items():
        r = ref_stats[name]
        assert a["calls"] == N_MICRO, (tag, name, a["calls"])  # no extra or recomputed forward
        assert torch.equal(a["tokens"], r["tokens"]) and torch.equal(a["kept"], r["kept"]), tag
        assert abs(a["aux"] - r["aux"]) <= 1e-6 * abs(r["aux"]) + 1e-9, tag
        assert abs(a["z"] - r["z"]) <= 1e-6 * abs(r["z"]) + 1e-9, tag
    n_checked = 0
    for part in pipe.parts:
        for name, p in part.named_parameters():
            assert p.grad is not None, (tag, name)
            ref = ref_grads[name]
            err = float((p.grad - ref).abs().max())
            assert err <= 1e-5 * float(ref.abs().max()) + 1e-8, (tag, name, err)
            n_checked += 1
    kept = sum(int(r["kept"].sum()) for r in ref_stats.values())
    routed = sum(int(r["tokens"].sum()) for r in ref_stats.values())
    return {"params": n_checked, "dropped": routed - kept,
            "names": sorted(n for part in pipe.parts for n, _ in part.named_parameters())}


def _run_schedule(rank, world, schedule):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (LOCAL, SEQ), generator=g)
    y = torch.randint(0, 64, (LOCAL, SEQ), generator=g)
    out = {}
    cases = [("drop", 1.0, None), ("dropless", None, None)]
    if schedule != "interleaved_1f1b":
        cases.append(("uneven", 1.0, [1, 3]))
    for tag, cf, pp_layers in cases:
        cfg = _cfg(schedule, cf, pp_layers)
        out[tag] = _check_case(cfg, mesh["pp"], x, y, f"{schedule}/{tag}")
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pipeline_matches_single_process(schedule):
    results = run_ranks(_run_schedule, 2, schedule)
    torch.manual_seed(0)
    all_names = sorted(n for n, _ in build_model(_cfg().model).named_parameters())
    for tag in results[0]:
        # Every parameter's gradient was checked, on exactly one rank.
        assert sorted(results[0][tag]["names"] + results[1][tag]["names"]) == all_names, tag
    assert results[0]["drop"]["dropped"] > 0  # capacity 1.0 really drops
    assert results[0]["dropless"]["dropped"] == 0
