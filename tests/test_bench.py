"""Smoke test of scripts/bench.py: a tiny model, two timed steps, one JSON object back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model.n_layers=1", "--model.d_model=64", "--model.n_heads=4",
        "--model.expert_hidden=64", "--model.ffn_hidden=128", "--model.vocab_size=512",
        "--data.seq_len=32", "--model.max_seq_len=32", "--train.batch_size=2",
        "--train.micro_batch_size=2", "--train.device=cpu",
        # One thread: on a busy 2-core machine, two OpenMP threads wait on each other at every
        # small op and the step gets ~5x slower.
        "--train.threads=1"]


@pytest.mark.slow
def test_bench_json_smoke():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config",
           str(ROOT / "configs" / "bench.yaml"), "--json", "--steps", "2", "--warmup", "1",
           "--impls", *TINY]
    # Run from elsewhere: the script must find the package by itself (fresh clone).
    proc = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"--json must print one line, got: {proc.stdout[-2000:]}"
    r = json.loads(lines[0])
    for key in ("moe_tokens_per_s", "dense_tokens_per_s", "mfu", "dense_mfu", "ratio",
                "ratio_paired", "peak_flops", "moe_active_params", "dense_active_params"):
        assert isinstance(r[key], (int, float)) and r[key] > 0, (key, r.get(key))
    assert r["device"] == "cpu" and r["torch"] and r["steps"] == 2
    # Same active parameters up to the router gate (d_model * n_experts = 64 * 16).
    assert r["moe_active_params"] - r["dense_active_params"] == 64 * 16
    assert set(r["impls"]) == {"grouped", "bmm", "loop"}
    assert all(v["tokens_per_s"] > 0 for v in r["impls"].values())
    assert 0 <= r["moe_drop_frac"] < 1


def test_stepper_drop_fraction_follows_capacity():
    """The bench's drop fraction is the router's: exactly 0 dropless, and past a tight capacity
    at least 1 - cf of the assignments are dropped (the experts hold cf x their fair share)."""
    import torch

    from moe.bench.step import Stepper
    from moe.config import load_config

    for cf, check in (("null", lambda d: d == 0.0), ("0.25", lambda d: d >= 0.75)):
        cfg = load_config(str(ROOT / "configs" / "bench.yaml"),
                          TINY + [f"--model.capacity_factor={cf}", "--model.min_capacity=0"])
        s = Stepper(cfg, cfg.model, torch.device("cpu"), None)
        before = [p.detach().clone() for p in s.model.parameters()]
        drops = [s.step()["drop_frac"] for _ in range(len(s.batches) + 1)]
        assert check(drops[0]), (cf, drops[0])
        # AdamW runs at lr 0: weights, and so routing, stay at initialisation (the same batch
        # drops the same share four steps later)
        assert drops[-1] == drops[0]
        assert all(torch.equal(a, p) for a, p in zip(before, s.model.parameters()))


@pytest.mark.slow
def test_bench_rejects_bad_override():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--json", "--model.nope=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "model.nope" in proc.stderr


def test_op_cpu_timer_counts_every_operator_forward_and_backward():
    import torch

    from moe.bench.ops import OpCpuTimer

    x = torch.randn(64, 64, requires_grad=True)
    with OpCpuTimer() as timer:
        (x @ x).relu().sum().backward()
    # forward mm, relu, sum; backward: sum's expand, relu's threshold_backward, mm's two mm
    assert timer.calls["mm"] == 3 and timer.calls["relu"] == 1 and timer.calls["sum"] == 1
    assert timer.calls["threshold_backward"] == 1
    assert set(timer.ns) == set(timer.calls) and all(v >= 0 for v in timer.ns.values())


def test_profile_cpu_prints_the_operator_table():
    import contextlib
    import io

    from moe.cli.bench import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--config", str(ROOT / "configs" / "bench.yaml"), "--profile-cpu", "--json",
                     "--steps", "2", "--warmup", "1", *TINY]) == 0
    r = json.loads(out.getvalue())
    names = [o["op"] for o in r["ops"]]
    assert "_grouped_mm" in names or "mm" in names  # the experts and the dense matmuls
    assert r["calls_per_step"] > 100 and 0 < r["kernels_cpu_ms"]
    assert all(o["calls"] > 0 and o["cpu_ms"] >= 0 for o in r["ops"])
