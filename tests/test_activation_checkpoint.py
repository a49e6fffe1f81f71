"""Activation checkpointing (train.activation_checkpointing): full and selective recomputation
give the losses, gradients and routing statistics of none, and keep every module name.

The model drops (capacity factor 1.0), jitters its router (random numbers drawn in forward),
routes top-2, and has dense layers between MoE layers (moe_every=2); steps accumulate two
micro-batches through the trainer's ShardedModel. A control shows the jitter test has teeth: without
RNG preservation, recomputation routes differently and the gradients change.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError, load_config
from moe.model import build_model
from moe.model.loss import lm_loss
from moe.parallel import activation_checkpoint as ac
from moe.parallel.activation_checkpoint import (
    apply_activation_checkpointing,
    checkpoint_mode,
    is_recomputing,
)
from moe.parallel.sharded_model import ShardedModel, moe_layer_names
from moe.train.metrics import RoutingAccumulator
from tests.dist_utils import run_ranks

SEQ, BATCH, MICRO = 16, 4, 2
TINY = ["--model.vocab_size=128", "--model.d_model=32", "--model.n_layers=4",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.ffn_hidden=64", "--model.moe_every=2",
        "--model.max_seq_len=16", "--model.capacity_factor=1.0", "--model.min_capacity=0",
        "--model.router_jitter=0.2", "--model.aux_loss_coef=0.1", "--model.z_loss_coef=0.01",
        f"--data.seq_len={SEQ}", f"--train.batch_size={BATCH}",
        f"--train.micro_batch_size={MICRO}"]


def _cfg(mode="none", *extra):
    return load_config(None, TINY + [f"--train.activation_checkpointing={mode}", *extra])


def _data():
    g = torch.Generator().manual_seed(1)
    xy = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def _step(mode, lm_weight=1.0, early_stop=True):
    """One trainer step (two micro-batches) through ShardedModel; what the trainer would log.

    early_stop=False: recomputation runs each block to its end instead of stopping once the
    saved tensors it needs are back, so the MoE forward hooks fire during it too."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        return _step_inner(mode, lm_weight)


def _step_inner(mode, lm_weight):
    cfg = _cfg(mode)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rt = ShardedModel(cfg, model)  # one process: the runtime applies checkpointing itself
    rt.train(True)
    calls = {"forward": 0, "recompute": 0}
    seen = {}

    def count(module, args, output):
        calls["recompute" if is_recomputing() else "forward"] += 1
        if not is_recomputing():
            seen[module] = module.last_stats

    for layer in rt.moe_layers().values():
        layer.register_forward_hook(count)
    x, y = _data()
    torch.manual_seed(5)  # the jitter's draws
    routing = RoutingAccumulator(moe_layer_names(cfg), cfg.model.n_experts)
    if lm_weight == 1.0:
        loss = rt.forward_backward(x, y, routing)
    else:  # router losses only: the LM loss contributes nothing
        rt.set_loss_scale(1.0)
        (lm_loss(model(x), y) * lm_weight).backward()
        loss = None
    # The statistics left for the trainer are the forward's, not a recomputation's.
    assert all(layer.last_stats is seen[layer] for layer in rt.moe_layers().values())
    return {"loss": loss, "routing": routing.summary(), "calls": calls,
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "names": [n for n, _ in model.named_parameters()],
            "state": list(model.state_dict()), "modes": [checkpoint_mode(b) for b in
                                                         model.layers.values()],
            "rng_after": torch.rand(4), "model": model}


@pytest.fixture(scope="module")
def reference(one_torch_thread):
    return _step("none")


@pytest.mark.parametrize("mode,early_stop", [("full", True), ("full", False),
                                             ("selective", False)])
def test_same_loss_gradients_and_routing_stats_as_none(reference, mode, early_stop):
    ref, got = reference, _step(mode, early_stop=early_stop)
    assert got["modes"] == [mode] * 4 and ref["modes"] == ["none"] * 4
    # Module names are an API: no _checkpoint_wrapped_module in any name.
    assert got["names"] == ref["names"] and got["state"] == ref["state"]
    assert "layers.1.feed_forward.router.gate.weight" in got["names"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-6, atol=1e-7, msg=name)
    # The statistics the trainer logs: same counts (drops included), losses and entropy.
    (scalars, layers), (ref_scalars, ref_layers) = got["routing"], ref["routing"]
    assert layers == ref_layers and scalars == pytest.approx(ref_scalars, rel=1e-6)
    assert ref_scalars["drop_frac"] > 0  # capacity 1.0 drops: the drop path is exercised
    # Forward hooks fire once per micro-batch and layer in forward; without early stop the
    # recomputation fires them again (2 MoE layers x 2 micro-batches), under is_recomputing().
    assert got["calls"]["forward"] == ref["calls"]["forward"] == 2 * 2
    assert got["calls"]["recompute"] == (0 if early_stop else 2 * 2)
    assert ref["calls"]["recompute"] == 0
    # The RNG continues as without recomputation (checkpoint forks it for the replay).
    assert torch.equal(got["rng_after"], ref["rng_after"])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_router_loss_gradient_injected_once(one_torch_thread, mode):
    """Router losses alone (LM loss x 0): the gates' gradients are theirs, injected once."""
    ref, got = _step("none", lm_weight=0.0), _step(mode, lm_weight=0.0)
    gate = "layers.1.feed_forward.router.gate.weight"
    assert float(ref["grads"][gate].abs().max()) > 1e-4
    torch.testing.assert_close(got["grads"][gate], ref["grads"][gate], rtol=1e-6, atol=0)


def test_jitter_control_without_rng_preservation(one_torch_thread, monkeypatch, reference):
    """Replaying without restoring the RNG draws other jitter, so the replay routes otherwise:
    other kept counts give other recomputed shapes (checkpoint's own check raises), or, with
    the same counts, other gradients. The equality above needs RNG preservation."""
    monkeypatch.setattr(ac, "checkpoint", functools.partial(torch.utils.checkpoint.checkpoint,
                                                            preserve_rng_state=False))
    try:
        got = _step("full")
    except torch.utils.checkpoint.CheckpointError as e:
        assert "shape" in str(e).lower()
        return
    err = max(float((got["grads"][n] - g).abs().max()) for n, g in reference["grads"].items())
    assert err > 1e-4


def test_eval_forward_copy_and_mode_switch(one_torch_thread):
    torch.manual_seed(0)
    model = build_model(_cfg().model)
    model.eval()
    x, _ = _data()
    with torch.no_grad():
        want = model(x)
    apply_activation_checkpointing(model, "selective")
    with torch.no_grad():
        assert torch.equal(model(x), want)
    twin = copy.deepcopy(model)  # stage building copies models: the copy runs its own blocks
    assert checkpoint_mode(twin.layers["0"]) == "selective"
    assert twin.layers["0"].forward.args[0] is twin.layers["0"]
    apply_activation_checkpointing(model, "none")
    assert [checkpoint_mode(b) for b in model.layers.values()] == ["none"] * 4
    assert "forward" not in model.layers["0"].__dict__
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        apply_activation_checkpointing(model, "some")
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        _cfg("offload")


def test_selective_policy_saves_matmuls_and_attention():
    ops = torch.ops.aten
    for op in (ops.mm.default, ops.addmm.default, ops.bmm.default, ops._grouped_mm.default,
               ops._scaled_dot_product_flash_attention_for_cpu.default,
               ops._local_scalar_dense.default):
        assert op in ac.SAVE_OPS, op
    for op in (ops.mul.Tensor, ops.rsqrt.default, ops.silu.default, ops.add.Tensor):
        assert op not in ac.SAVE_OPS, op


def test_trainer_run_with_full_checkpointing_matches_none(tmp_path):
    from moe.train.loop import train
    from tests.test_train import TINY as TRAIN_TINY

    losses = {}
    for mode in ("none", "full"):
        cfg = load_config(None, TRAIN_TINY + [
            f"--data.cache_dir={tmp_path / 'cache'}", f"--train.run_dir={tmp_path / mode}",
            "--train.max_steps=4", "--train.eval_every=4", "--train.ckpt_every=100",
            "--train.micro_batch_size=4", "--model.router_jitter=0.1",
            f"--train.activation_checkpointing={mode}"])
        train(cfg)
        rows = [json.loads(line) for line in
                (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [(r["step"], r["loss"], r["grad_norm"], r["drop_frac"]) for r in rows
                        if "lm_loss" in r] + [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses["none"]) == 5
    for a, b in zip(losses["none"][:-1], losses["full"][:-1]):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-6, abs=1e-9)
    assert losses["full"][-1] == pytest.approx(losses["none"][-1], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Pipeline: the routing hook counts a recomputed forward once (2 spawned gloo ranks)


def _pp_run(rank, world):
    """pp=2, 1F1B, two micro-batches, jitter on: none, full and selective on this rank's
    stage. Returns plain data (tensors do not survive the trip back through the queue)."""
    from moe.parallel.pipeline import Pipeline, build_stage_models
    from tests.helpers import build_mesh

    cfg = _cfg("none", "--parallel.pp=2", "--parallel.pp_schedule=1f1b",
               f"--parallel.pp_microbatches={BATCH // MICRO}")
    mesh = build_mesh(pp=2)
    x, y = _data()
    out = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        stages = build_stage_models(build_model(cfg.model), rank, 2, cfg)
        apply_activation_checkpointing([m for _, m in stages], mode)
        acc = RoutingAccumulator(moe_layer_names(cfg), cfg.model.n_experts)
        calls = []

        def on_moe(name, layer, share, calls=calls, acc=acc):
            calls.append((name, is_recomputing()))
            acc.add_layer(name, layer, share)

        pipe = Pipeline(stages, mesh["pp"], cfg, (MICRO, SEQ), BATCH // MICRO, "cpu",
                               global_batch=BATCH, on_moe_forward=on_moe)
        for part in pipe.parts:
            part.train(True)
        torch.manual_seed(5)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # hooks fire in replay
            loss = pipe.step(x, y)
        out[mode] = {"loss": None if loss is None else float(loss), "calls": calls,
                     "routing": acc.summary(),
                     "grads": {n: p.grad.clone() for part in pipe.parts
                               for n, p in part.named_parameters()}}
    ref = out["none"]
    errors = []
    for mode in ("full", "selective"):
        got = out[mode]
        for key in ("calls", "routing", "loss"):
            if got[key] != ref[key]:
                errors.append(f"{mode}: {key} {got[key]} != {ref[key]}")
        for n, g in ref["grads"].items():
            if not torch.allclose(got["grads"][n], g, rtol=1e-6, atol=1e-7):
                errors.append(f"{mode}: gradient of {n}")
    return {"errors": errors, "calls": ref["calls"], "drop_frac": ref["routing"][0]["drop_frac"]}


@pytest.mark.slow
def test_pipeline_routing_stats_counted_once_under_checkpointing():
    for res in run_ranks(_pp_run, 2):
        assert not res["errors"], res["errors"]
        assert len(res["calls"]) == 2  # one MoE layer per stage, two micro-batches
        assert res["drop_frac"] > 0


def test_memory_bench_measures_each_mode(one_torch_thread):
    """scripts/bench.py --ac's per-process measurement, run here in-process on a tiny shape."""
    from moe.bench.memory import measure_mode
    from tests.test_bench import TINY as BENCH_TINY

    raw = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "bench.yaml"),
                      BENCH_TINY).to_dict()
    runs = [measure_mode(raw, mode, steps=1, warmup=1) for mode in ("none", "selective")]
    assert [r["mode"] for r in runs] == ["none", "selective"]
    assert runs[0]["loss"] == runs[1]["loss"]  # same model, same batches
    for r in runs:
        assert r["peak_mib"] >= 0 and r["tokens_per_s"] > 0 and "VmHWM" in r["measure"]
