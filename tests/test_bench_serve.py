"""The server's load test (moe/bench/serve.py, moe/bench/serve_run.py, moe/cli/bench_serve.py):
percentiles and every invariant on hand-made numbers, each shown to FAIL when it should; the
load plan's shares and determinism; the command's exit status; and (slow) a small load on a
random model served by a real moe-serve subprocess, every invariant passing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.bench.serve import (
    Result,
    Settings,
    check_cut,
    check_idle,
    check_requests,
    check_rss,
    check_stop,
    judge,
    percentile,
    plan,
    source_text,
)
from moe.cli import bench_serve

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.d_model=32", "--model.n_layers=2", "--model.n_experts=4",
         "--model.expert_hidden=32", "--model.vocab_size=512", "--model.max_seq_len=64",
         "--data.seq_len=64"]


def test_percentile_is_the_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile(values, 100) == 100 and percentile(values, 0) == 1
    assert percentile([3.0, 1.0, 2.0], 50) == 2 and percentile([3.0, 1.0, 2.0], 99) == 3
    assert percentile([10.0, 20.0], 50) == 10 and percentile([7.0], 99) == 7
    assert percentile([], 50) is None


def good_results() -> list[Result]:
    return [Result("ok", False, 200, "length"),
            Result("ok", True, 200, "stop", done=True),
            Result("disconnect", True, 200, closed_early=True),
            Result("disconnect", True, 200, "length", done=True),  # ended before its cut
            Result("malformed", False, 400, error_shape=True),
            Result("malformed", False, 422, error_shape=True)]


@pytest.mark.parametrize("wrong", [
    Result("ok", False, 500, "length"),
    Result("ok", False, 200, None),  # no finish_reason
    Result("ok", True, 200, "length"),  # a stream without data: [DONE]
    Result("ok", True, 200, "length", done=True, error="error chunk: boom"),
    Result("ok", False, None, error="ReadTimeout: "),
    Result("disconnect", True, 503, closed_early=True),
    Result("malformed", False, 200, "length"),  # accepted
    Result("malformed", False, 400),  # not OpenAI's error shape
    Result("malformed", False, 500, error_shape=True),
    Result("malformed", False, None, error="RemoteProtocolError: "),
], ids=lambda r: f"{r.kind}-{r.status}-{r.finish_reason}-{r.done}-{r.error_shape}")
def test_one_wrong_answer_fails_its_check(wrong):
    checks = check_requests(good_results())
    assert [c.passed for c in checks] == [True, True]
    assert [c.detail for c in checks] == ["4/4 right", "2/2 right"]
    assert judge(wrong) is not None
    checks = check_requests(good_results() + [wrong])
    failed = [c for c in checks if not c.passed]
    assert len(failed) == 1 and failed[0].name.startswith(
        "malformed" if wrong.kind == "malformed" else "well-formed")
    assert "first wrong: #" in failed[0].detail


def test_idle_memory_cut_and_stop_checks_fail_past_their_bounds():
    assert check_idle(0, 0, "ok").passed
    assert not check_idle(1, 0, "ok").passed and not check_idle(0, 1, "ok").passed
    assert not check_idle(0, 0, "?").passed
    s = Settings(rss_tolerance_frac=0.10, rss_tolerance_mb=50)
    mb = 1024
    assert check_rss(1000 * mb, 1100 * mb, s).passed  # 10% of 1000 MB beats 50 MB
    assert not check_rss(1000 * mb, 1100 * mb + 1, s).passed
    assert check_rss(100 * mb, 150 * mb, s).passed  # 50 MB beats 10% of 100 MB
    assert not check_rss(100 * mb, 151 * mb, s).passed
    assert "+51.0 MB; allowed +50 MB" in check_rss(100 * mb, 151 * mb, s).detail
    assert check_cut(3, 120, 0, 8).passed
    assert not check_cut(60, 120, 0, 8).passed  # decoded on for nobody until halfway
    assert not check_cut(3, 120, 1, 8).passed  # one left in its slot
    assert not check_cut(0, 120, 0, 0).passed  # nothing was cut off: nothing checked
    assert check_stop(0, 0.3, 10).passed and check_stop(-15, 0.3, 10).passed
    assert not check_stop(None, 10.0, 10).passed  # had to be killed
    assert not check_stop(1, 0.3, 10).passed  # crashed on the way out


def test_the_plan_has_its_shares_is_seeded_and_fits_the_context():
    text, ctx = source_text(), 128
    assert text.isascii() and len(text) > 10_000
    specs = plan(Settings(), 200, 0, "m", ctx, text)
    assert plan(Settings(), 200, 0, "m", ctx, text) == specs
    assert plan(Settings(), 200, 1, "m", ctx, text) != specs
    kinds = [sp.kind for sp in specs]
    assert (kinds.count("malformed"), kinds.count("disconnect")) == (10, 20)
    assert sum(sp.tiny for sp in specs) == 6
    bodies = []
    for sp in specs:
        try:
            bodies.append((sp, json.loads(sp.raw)))
        except json.JSONDecodeError:
            assert sp.kind == "malformed"
    bad = [b for sp, b in bodies if sp.kind == "malformed"]
    assert len(bad) == 7  # 3 of the 10 are broken JSON
    # the 4 faults in turn: 3 broken JSON, 3 wrong types, 2 unknown fields, 2 long prompts
    assert sum(isinstance(b["max_tokens"], str) for b in bad) == 3
    assert sum("frobnicate" in b for b in bad) == 2
    assert sum(isinstance(b["prompt"], list) and len(b["prompt"]) > ctx for b in bad) == 2
    for sp, b in bodies:
        if sp.kind == "malformed":
            continue
        assert len(b["prompt"]) + b["max_tokens"] <= ctx  # chars >= byte-level BPE tokens
        assert b.get("stream", False) == sp.stream
        if sp.kind == "disconnect":
            assert sp.stream and b["ignore_eos"] and b["max_tokens"] == ctx // 2
        if sp.tiny:
            assert b["temperature"] == 1e-40 and "seed" not in b
    assert 0.3 < sum(sp.stream for sp in specs if sp.kind == "ok") / 170 < 0.7


def fake_result(passed: bool) -> dict:
    checks = [{"name": "well-formed requests", "passed": True, "detail": "3/3 right"},
              {"name": "server memory flat", "passed": passed, "detail": "+99 MB"}]
    lat = {"p50": 1.0, "p99": 2.0, "n": 3}
    return {"run": "random tiny.yaml", "model": "random", "context": 128, "machine": "cpu",
            "loadavg_start": 1.0, "loadavg_end": 1.0, "requests": 3, "wall_s": 1.0,
            "settings": {"slots": 8, "threads": 1, "clients": 2}, "streaming": 1,
            "kinds": {"ok": 3, "malformed": 0, "disconnect": 0}, "tiny_temperature": 0,
            "requests_per_s": 3.0, "generated_tokens_per_s": 9.0,
            "server_generated_tokens_per_s": 9.0, "ttft_ms": lat, "itl_ms": lat,
            "outcomes": {"length": 3.0}, "checks": checks, "passed": passed}


@pytest.mark.parametrize("passed", [True, False])
def test_the_command_exits_1_when_an_invariant_fails(monkeypatch, capsys, passed):
    seen = {}

    def fake(settings, log):
        seen["settings"] = settings
        return fake_result(passed)

    monkeypatch.setattr(bench_serve, "run_serve_bench", fake)
    assert bench_serve.main(["--requests", "3", "--clients", "2", "--threads", "1",
                             *SMALL]) == (0 if passed else 1)
    out = capsys.readouterr().out
    assert ("FAIL  server memory flat" in out) != passed and "PASS  well-formed" in out
    assert seen["settings"].overrides == SMALL and seen["settings"].clients == 2
    with pytest.raises(SystemExit):  # a share above 1 is a usage error
        bench_serve.main(["--malformed", "2"])
    with pytest.raises(SystemExit):  # overrides are for the random model only
        bench_serve.main(["--run", "runs/tiny", "--model.d_model=64"])


@pytest.mark.slow
def test_a_small_load_on_a_random_model_keeps_every_invariant(tmp_path):
    """24 requests from 4 clients (5 malformed: every kind of fault at least once, 2 cut off,
    1 at temperature 1e-40) through scripts/bench_serve.py: a moe-serve subprocess on a
    random model, every check PASS, exit status 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--requests", "24",
           "--clients", "4", "--warmup", "4", "--malformed", "0.2", "--threads", "1",
           "--json", *SMALL]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["passed"] and len(out["checks"]) == 8
    assert all(c["passed"] for c in out["checks"]), out["checks"]
    assert out["kinds"] == {"ok": 17, "malformed": 5, "disconnect": 2}
    assert out["tiny_temperature"] == 1 and out["context"] == 64
    assert out["requests_per_s"] > 0 and out["ttft_ms"]["p50"] is not None
    assert out["stop"]["exit_code"] in (0, -15) and out["stop"]["seconds"] < 10
    assert 1 <= out["outcomes"]["aborted"] <= 2  # a cut-off stream is aborted, not decoded on
