"""The whole trainer under every parallel layout gives the losses of one process.

Each layout runs ``moe.train.train`` on spawned gloo ranks for a few steps on the built-in
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
from dist_utils import run_ranks

from moe.config import load_config
from moe.train import train

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
    "dp2_ep2_zero1": (4, ["--parallel.dp=2", "--parallel.ep=2", "--parallel.zero1=true"]),
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


def test_zero1_owner_assignment_balances_sizes():
    import torch

    from moe.parallel.zero import assign_owners

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 7, 6, 3, 1)]
    # largest first to the least loaded rank: 10->0, 7->1, 6->1 (7<10), 3->0 (10<13), 1->0
    assert assign_owners(params, 2) == [0, 1, 1, 0, 0]
    assert assign_owners(params, 1) == [0] * 5
