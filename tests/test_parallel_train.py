"""The whole trainer under every parallel layout gives the losses of one process.

Each layout runs ``moe.train.loop.train`` on spawned gloo ranks for a few steps on the built-in
corpus, with token dropping active (capacity factor 1.0) and, for some layouts, dropless; every
logged number (loss, aux and z losses, drop fraction, per-expert counts, gradient norm, val
loss) must match the single-process run. torchrun jobs then check the launcher path (4 ranks,
and 1 rank, which still makes a process group) and resuming across layouts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

from moe.checkpoint import read_extra
from moe.config import load_config
from moe.train.loop import train

ROOT = Path(__file__).resolve().parents[1]

BASE = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=4",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=4",
        "--train.warmup_steps=2", "--train.max_steps=3", "--train.decay_steps=4",
        "--train.eval_every=3", "--data.val_windows=8", "--train.sample_tokens=0",
        "--log.progress=false", "--log.log_every=1"]

LAYOUTS = {
    "tp2": (2, ["--parallel.tp=2"]),
    "pp2_gpipe": (2, ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, ["--parallel.pp=2", "--parallel.pp_schedule=1f1b"]),
    "pp2_interleaved": (2, ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"]),
    "dp2": (2, ["--parallel.dp=2"]),
    "ep2": (2, ["--parallel.ep=2"]),
    "tp2_pp2": (4, ["--parallel.tp=2", "--parallel.pp=2"]),
    "dp2_ep2": (4, ["--parallel.dp=2", "--parallel.ep=2"]),
    "dp2_ep2_zero1": (4, ["--parallel.dp=2", "--parallel.ep=2", "--parallel.dp_shard=zero1"]),
    # FSDP2 (moe/parallel/fsdp.py) alone and composed with each other kind of parallelism
    "dp2_fsdp": (2, ["--parallel.dp=2", "--parallel.dp_shard=fsdp"]),
    "dp2_ep2_fsdp": (4, ["--parallel.dp=2", "--parallel.ep=2", "--parallel.dp_shard=fsdp"]),
    "tp2_dp2_fsdp": (4, ["--parallel.tp=2", "--parallel.dp=2", "--parallel.dp_shard=fsdp"]),
    "pp2_dp2_fsdp": (4, ["--parallel.pp=2", "--parallel.dp=2", "--parallel.dp_shard=fsdp"]),
}
CASES = [(name, "1.0") for name in LAYOUTS] + [("ep2", "null"), ("pp2_1f1b", "null")]
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "router_loss", "drop_frac", "grad_norm",
        "router_entropy", "val_loss")


def _overrides(tmp, name, capacity, extra=()):
    return BASE + [f"--model.capacity_factor={capacity}", f"--data.cache_dir={tmp / 'cache'}",
                   f"--train.run_dir={tmp / name}", *extra]


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_rank(rank, world_size, overrides):
    train(load_config(None, overrides))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def reference(workdir):
    """Single-process rows per capacity factor, computed once."""
    cache = {}

    def get(capacity):
        if capacity not in cache:
            train(load_config(None, _overrides(workdir, f"single_{capacity}", capacity)))
            cache[capacity] = _rows(workdir / f"single_{capacity}")
        return cache[capacity]

    return get


def _assert_same(ref, rows, tag):
    """Train rows step by step; val rows at the reference's val steps (a run that stopped and
    resumed also evaluated where it stopped)."""
    val_steps = {r["step"] for r in ref if "val_loss" in r}
    rows = [r for r in rows if "lm_loss" in r or r["step"] in val_steps]
    assert [r["step"] for r in ref] == [r["step"] for r in rows], tag
    for a, b in zip(ref, rows):
        for key in KEYS:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (tag, a["step"], key)
        if "layers" in a:
            for layer, st in a["layers"].items():
                other = b["layers"][layer]
                assert st["tokens_per_expert"] == other["tokens_per_expert"], (tag, layer)
                assert st["kept_per_expert"] == other["kept_per_expert"], (tag, layer)


@pytest.mark.slow
@pytest.mark.parametrize("name,capacity", CASES)
def test_layout_matches_one_process(workdir, reference, name, capacity):
    ref = reference(capacity)
    if capacity == "1.0":
        assert ref[0]["drop_frac"] > 0  # dropping is active
    else:
        assert all(r.get("drop_frac", 0) == 0 for r in ref)
    world, extra = LAYOUTS[name]
    overrides = _overrides(workdir, f"{name}_{capacity}", capacity, extra)
    run_ranks(_train_rank, world, overrides, timeout_s=300)
    _assert_same(ref, _rows(workdir / f"{name}_{capacity}"), name)


@pytest.mark.slow
def test_torchrun_tp2_pp2_then_resume_in_one_process(workdir, reference):
    """scripts/train.py under torchrun (4 ranks, tp2 x pp2) for 1 step, resumed under torchrun
    with one rank (the distributed path, every size 1) to step 2, then in one plain process to
    step 3: the same losses as one unbroken single-process run; the checkpoint also
    consolidates into one plain state dict."""
    ref = reference("1.0")
    run = workdir / "torchrun"
    args = _overrides(workdir, "torchrun", "1.0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = launcher + ["--nproc_per_node=4", "scripts/train.py", *args, "--train.max_steps=1",
                      "--parallel.tp=2", "--parallel.pp=2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (run / "checkpoints" / "step_00000001" / "extra.pt").is_file(), out.stderr[-3000:]
    assert "tensor: tp=2" in out.stderr
    cmd = launcher + ["--nproc_per_node=1", "scripts/train.py", *args, "--train.max_steps=2"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (run / "checkpoints" / "step_00000002" / "extra.pt").is_file(), out.stderr[-3000:]
    assert "parallelize (" in out.stderr  # a process group and mesh, though of one rank
    train(load_config(None, args))  # one plain process, resumes from the world-1 checkpoint
    _assert_same(ref, _rows(run), "tp2_pp2 -> torchrun world 1 -> single")

    plain = workdir / "consolidated.pt"
    out = subprocess.run([sys.executable, "scripts/consolidate.py", "--checkpoint", str(run),
                          "--out", str(plain)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import torch

    state = torch.load(plain, weights_only=True)
    assert state["model"]["layers.3.feed_forward.experts.w1"].shape == (4, 64, 64)
    assert state["model"]["layers.0.attention.wq.weight"].shape == (64, 64)


@pytest.mark.slow
def test_fsdp_run_resumes_from_and_into_other_layouts(workdir, reference):
    """Through the trainer, a checkpoint crosses into FSDP2 and out of it: step 1 in one
    process, step 2 at dp2 with parallel.dp_shard=fsdp, step 3 in one process again give the
    rows of one unbroken run (tests/test_parallel_checkpoint.py reshards every tensor; this
    checks the loop around it: AdamW's DTensor state, its step and hyper-parameters)."""
    ref = reference("1.0")
    args = _overrides(workdir, "fsdp_resume", "1.0")
    train(load_config(None, args + ["--train.max_steps=1"]))
    run_ranks(_train_rank, 2, args + ["--train.max_steps=2", "--parallel.dp=2",
                                      "--parallel.dp_shard=fsdp"], timeout_s=300)
    train(load_config(None, args))
    _assert_same(ref, _rows(workdir / "fsdp_resume"), "single -> dp2 fsdp -> single")


# A ramp of 2, 2, 4, 8 sequences (increments of 2 over 256 tokens of 32-token windows).
RAMP = ["--train.batch_ramp_tokens=256", "--train.batch_ramp_start=2",
        "--train.batch_ramp_increment=2", "--train.max_steps=4"]


@pytest.mark.slow
def test_batch_ramp_and_validation_are_the_same_on_every_layout(workdir):
    """The ramp is the config's (moe/optim/adamw.py batch_size_at): one process, dp2, ep2 and a run
    resumed at dp2 after 2 single-process steps train on the same batches and log the same
    numbers; the val loss is the same though each uses another micro-batch size
    (data.val_windows, not micro-batches, defines the validation set)."""
    ref_dir = workdir / "ramp_single"
    train(load_config(None, _overrides(workdir, "ramp_single", "1.0", RAMP)))
    ref = _rows(ref_dir)
    assert [r["batch_size"] for r in ref if "lm_loss" in r] == [2, 2, 4, 8]
    for name, world, extra in (("dp2", 2, ["--parallel.dp=2", "--train.micro_batch_size=2"]),
                               ("ep2", 2, ["--parallel.ep=2", "--train.micro_batch_size=1"])):
        run_ranks(_train_rank, world, _overrides(workdir, f"ramp_{name}", "1.0", RAMP + extra),
                  timeout_s=300)
        _assert_same(ref, _rows(workdir / f"ramp_{name}"), f"ramp {name}")
    resumed = _overrides(workdir, "ramp_resumed", "1.0", RAMP)
    train(load_config(None, resumed + ["--train.max_steps=2", "--train.micro_batch_size=8"]))
    run_ranks(_train_rank, 2, resumed + ["--parallel.dp=2"], timeout_s=300)
    rows = _rows(workdir / "ramp_resumed")
    assert [r["batch_size"] for r in rows if "lm_loss" in r] == [2, 2, 4, 8]
    _assert_same(ref, rows, "ramp single -> dp2")


def test_ramp_a_layout_cannot_split_is_refused_naming_the_keys():
    from moe.config import ConfigError
    from moe.parallel.mesh import ParallelDims

    cfg = load_config(None, BASE + ["--train.batch_ramp_tokens=256",
                                    "--train.batch_ramp_start=3"])
    ParallelDims().validate(cfg, 1)  # one process splits anything
    with pytest.raises(ConfigError, match="train.batch_ramp_start=3 does not split over "
                                          "parallel.dp x parallel.ep = 2") as e:
        ParallelDims(dp=2).validate(cfg, 2)
    assert "train.batch_ramp_increment" in str(e.value)
    cfg.train.batch_ramp_start = 2  # the increment (one group of 1) is still 1
    with pytest.raises(ConfigError, match="train.batch_ramp_increment=1"):
        ParallelDims(ep=2).validate(cfg, 2)
    cfg.train.batch_ramp_increment = 2
    ParallelDims(ep=2).validate(cfg, 2)
    with pytest.raises(ConfigError, match="train.batch_ramp_start=2 does not split"):
        ParallelDims(dp=2, ep=2).validate(cfg, 4)


@pytest.mark.slow
def test_pipeline_resume_with_router_jitter_is_exact(workdir):
    """Each rank's generator is checkpointed (moe/parallel/rng.py): pp2's second stage draws
    its own jitter, and a 2 + 2 step run equals 4 straight steps row for row, per-expert counts
    included."""
    # Stage 0 holds 1 MoE layer, stage 1 three: their generators advance differently.
    jitter = ["--model.router_jitter=0.1", "--parallel.pp=2", "--parallel.pp_layers=[1,3]",
              "--train.max_steps=4", "--train.ckpt_every=2"]
    run_ranks(_train_rank, 2, _overrides(workdir, "pp_jitter_full", "1.0", jitter),
              timeout_s=300)
    part = _overrides(workdir, "pp_jitter_part", "1.0", jitter)
    run_ranks(_train_rank, 2, part + ["--train.max_steps=2"], timeout_s=300)
    run_ranks(_train_rank, 2, part, timeout_s=300)
    full, parted = (_rows(workdir / n) for n in ("pp_jitter_full", "pp_jitter_part"))
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in full if "lm_loss" in r]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"}
                     for r in parted if "lm_loss" in r]
    extra = read_extra(workdir / "pp_jitter_part" / "checkpoints" / "step_00000004")
    rng = extra["rng"]
    assert rng["layout"] == [2, 1, 1, 1] and len(rng["ranks"]) == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])


def test_zero1_owner_assignment_balances_sizes():
    import torch

    from moe.optim.zero import assign_owners

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 7, 6, 3, 1)]
    # largest first to the least loaded rank: 10->0, 7->1, 6->1 (7<10), 3->0 (10<13), 1->0
    assert assign_owners(params, 2) == [0, 1, 1, 0, 0]
    assert assign_owners(params, 1) == [0] * 5


def test_grad_norm_is_fp32_accurate_and_clip_scales_every_gradient():
    from torch import nn

    from moe.model import build_model, lm_loss
    from moe.parallel.grads import clip_gradients, grad_norm

    # The configs/ablate.yaml model's gradients: torch._foreach_norm was 2-4e-6 off here in
    # fp32 (its head gradient 5e-6), the per-parameter sums 3-9e-8.
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "ablate.yaml"), [])
    model = build_model(cfg.model, seed=0)
    x = torch.randint(0, cfg.model.vocab_size, (16, 65), generator=torch.Generator().manual_seed(0))
    lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    exact = torch.stack([p.grad.double().pow(2).sum() for p in model.parameters()]).sum().sqrt()
    torch.testing.assert_close(grad_norm([model], None).double(), exact, rtol=5e-7, atol=0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model.extra = nn.Parameter(torch.randn(3, 5, dtype=torch.bfloat16))  # a second dtype
    (model(torch.randn(6, 8)).square().sum() + model.extra.float().sum() * 3).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = grad_norm([model], None)
    # Clipping multiplies every gradient, of every dtype, by one fp32 factor (exactly).
    scale = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
    assert scale < 1
    assert clip_gradients([model], None, 0.5) == norm
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g * scale.to(g.dtype), rtol=0, atol=0)
    # Non-finite gradients give a non-finite norm (the trainer's guard reads it).
    model.extra.grad[0, 0] = float("inf")
    assert grad_norm([model], None) == float("inf")
    model.extra.grad[0, 0] = float("nan")
    assert grad_norm([model], None).isnan()
