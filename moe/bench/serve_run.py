"""The serving load test, end to end: a server subprocess, a warm-up, the load, the checks.

``run_serve_bench(settings)`` starts ``python -m moe.cli.serve`` on a free loopback port (on
``settings.run``, or on a random model saved to a temporary folder: ``random_run``), waits for
``/health``, then:

1. **warm-up**: ``settings.warmup`` requests of the load's mix (another seed), so the
   allocator, the engine's batch shapes and every error path have run once; the server's
   resident memory (VmRSS of /proc/<pid>/status) is read after it;
2. **load**: ``settings.requests`` requests from ``settings.clients`` clients (moe/bench/serve.py
   says what they are and how the figures are taken), timed as a whole for requests/s and
   generated tokens/s;
3. **after**: ``/metrics`` until no request waits or runs (at most ``settle_s``: a stream cut
   off is aborted once the server notices its client has gone), ``/health``, VmRSS again,
   the 1e-40 requests again at temperature 0 (the same text), one normal request, one long
   stream per slot cut off together (the engine must stop decoding them: counted in steps),
   and one SIGTERM (the server must exit within ``stop_timeout_s``).

The client runs in this process, on the same CPUs as the server: on a 2-core machine it takes
part of the time it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx

from moe.bench.decode import _loadavg, _machine
from moe.bench.serve import (
    ROOT,
    TINY_TEMPERATURE,
    Check,
    Result,
    Settings,
    Spec,
    check_cut,
    check_idle,
    check_requests,
    check_rss,
    check_stop,
    judge,
    percentile,
    plan,
    rss_allowed_kb,
    run_load,
    source_text,
)
from moe.checkpoint import save_checkpoint
from moe.config import load_config
from moe.data import train_bpe
from moe.model import build_model


def random_run(folder: Path, s: Settings) -> Path:
    """A run folder holding a random model of ``s.config`` (dropless, weights from ``s.seed``)
    and a tokenizer trained on ``source_text()``: something to serve with nothing trained."""
    cfg = load_config(s.config, ["--model.capacity_factor=null",
                                 "--model.eval_capacity_factor=null", *s.overrides])
    save_checkpoint(folder, 0, build_model(cfg.model, seed=s.seed).eval(),
                    extra={"config": cfg.to_dict()})
    train_bpe([source_text()], cfg.model.vocab_size).save(folder / "tokenizer.json")
    return folder


def start_server(run: Path, s: Settings, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``python -m moe.cli.serve`` on a free loopback port; (process, base url) once /health
    answers. RuntimeError (with the server's last output) if it exits or never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    cmd = [sys.executable, "-m", "moe.cli.serve", "--run", str(run), "--port", str(port),
           "--slots", str(s.slots), "--threads", str(s.threads),
           "--max-waiting", str(s.max_waiting), "--log-level", "warning"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + s.startup_timeout_s
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    tail = "\n".join(log_path.read_text().splitlines()[-15:])
    raise RuntimeError(f"the server did not come up (exit code {proc.returncode}):\n{tail}")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {sample name with its labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def stop_server(proc: subprocess.Popen, timeout_s: float) -> tuple[int | None, float]:
    """One SIGTERM; (exit code or None if it had to be killed, seconds waited)."""
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    return code, time.perf_counter() - t0


def run_serve_bench(s: Settings, log: Callable[[str], None] = lambda m: None) -> dict:
    """Start the server, warm it up, load it, check it, stop it: the figures and the checks
    (``checks``: name, passed, detail each) as one dict."""
    with tempfile.TemporaryDirectory(prefix="moe-bench-serve-") as tmp:
        tmp = Path(tmp)
        if s.run is None:
            log(f"a random model of {s.config} (seed {s.seed}) in {tmp / 'random'}")
        run = Path(s.run) if s.run is not None else random_run(tmp / "random", s)
        proc, url = start_server(run, s, tmp / "server.log")
        try:
            return _bench(s, proc, url, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _bench(s: Settings, proc: subprocess.Popen, url: str, log: Callable[[str], None]) -> dict:
    card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    model, ctx, text = card["id"], card["max_model_len"], source_text()
    if (s.max_prompt_chars or ctx * 3 // 8) + (s.max_tokens or ctx // 2) > ctx:
        raise ValueError(f"--max-prompt-chars + --max-tokens must fit the context ({ctx})")
    out: dict = {"machine": _machine(), "loadavg_start": _loadavg(), "model": model,
                 "context": ctx, "run": s.run or f"random {Path(s.config).name}",
                 "settings": asdict(s)}
    completions = url + "/v1/completions"
    log(f"warm-up: {s.warmup} requests")
    warm = asyncio.run(run_load(completions, plan(s, s.warmup, s.seed + 1, model, ctx, text),
                                s.clients, s.disconnect_after, s.request_timeout_s))[0]
    before = _wait_idle(url, s.settle_s)
    warm_kb = rss_kb(proc.pid)
    specs = plan(s, s.requests, s.seed, model, ctx, text)
    log(f"load: {len(specs)} requests from {s.clients} clients")
    results, wall = asyncio.run(run_load(completions, specs, s.clients, s.disconnect_after,
                                         s.request_timeout_s))
    after = _wait_idle(url, s.settle_s)
    health = httpx.get(url + "/health", timeout=30).json().get("status", "?")
    after_kb = rss_kb(proc.pid)
    out.update(_figures(results, specs, wall, before, after),
               rss_mb={"warm": warm_kb / 1024, "after": after_kb / 1024,
                       "allowed_growth": rss_allowed_kb(warm_kb, s) / 1024})
    checks = check_requests(warm + results)
    checks.append(_greedy_check(url, specs, results, s.request_timeout_s))
    checks += [check_idle(after["moe_requests_waiting"], after["moe_requests_running"], health),
               check_rss(warm_kb, after_kb, s)]
    r = httpx.post(completions, json={"model": model, "prompt": "def ", "max_tokens": 8,
                                      "temperature": 0}, timeout=s.request_timeout_s)
    finish = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else None
    checks.append(Check("a normal request afterwards", finish in ("stop", "length"),
                        f"status {r.status_code}, finish_reason {finish}"))
    log(f"{s.slots} streams cut off together")
    checks.append(_cut_check(url, s, model, ctx))
    log("SIGTERM")
    code, seconds = stop_server(proc, s.stop_timeout_s)
    checks.append(check_stop(code, seconds, s.stop_timeout_s))
    out.update(stop={"exit_code": code, "seconds": seconds}, loadavg_end=_loadavg(),
               checks=[asdict(c) for c in checks], passed=all(c.passed for c in checks))
    return out


def _wait_idle(url: str, settle_s: float) -> dict[str, float]:
    """``/metrics`` once nothing waits or runs, or after ``settle_s``: a stream cut off is
    aborted when the server notices its client has gone, a moment after the client closes."""
    deadline = time.time() + settle_s
    while True:
        m = scrape(url)
        if m["moe_requests_waiting"] == m["moe_requests_running"] == 0 or time.time() > deadline:
            return m
        time.sleep(0.1)


def _figures(results: list[Result], specs: list[Spec], wall: float, before: dict,
             after: dict) -> dict:
    streams = [r for r in results if r.kind == "ok" and r.stream and judge(r) is None]
    gaps = [b - a for r in streams for a, b in zip(r.chunk_s, r.chunk_s[1:])]
    ttft = [r.chunk_s[0] for r in streams if r.chunk_s]
    tokens = sum(r.tokens for r in results if r.kind == "ok")
    server_tokens = after["moe_generation_tokens_total"] - before["moe_generation_tokens_total"]
    return dict(
        requests=len(results), wall_s=wall, requests_per_s=len(results) / wall,
        generated_tokens=tokens, generated_tokens_per_s=tokens / wall,
        server_generated_tokens_per_s=server_tokens / wall,
        kinds={k: sum(r.kind == k for r in results) for k in ("ok", "malformed", "disconnect")},
        streaming=sum(r.stream for r in results), tiny_temperature=sum(sp.tiny for sp in specs),
        outcomes={k.split("=")[1].rstrip("}"): after[k] - before[k] for k in after
                  if k.startswith("moe_requests_total{")},
        ttft_ms={"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99)),
                 "n": len(ttft)},
        itl_ms={"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99)),
                "n": len(gaps)})


def _cut_check(url: str, s: Settings, model: str, ctx: int) -> Check:
    """One stream per slot, all cut off after ``disconnect_after`` chunks: the engine steps
    until every slot is free again (from /health), against the steps their full length
    takes. Counted in steps, not seconds, so the machine's load does not move it."""
    max_tokens = ctx - 8
    body = {"model": model, "prompt": "def ", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    specs = [Spec("disconnect", json.dumps(body).encode(), True)] * s.slots
    steps0 = httpx.get(url + "/health", timeout=30).json()["steps"]
    results, _ = asyncio.run(run_load(url + "/v1/completions", specs, s.slots,
                                      s.disconnect_after, s.request_timeout_s))
    idle = _wait_idle(url, s.settle_s)
    steps = httpx.get(url + "/health", timeout=30).json()["steps"] - steps0
    running = idle["moe_requests_running"] + idle["moe_requests_waiting"]
    return check_cut(steps, max_tokens, running, sum(r.closed_early for r in results))


def _greedy_check(url: str, specs: list[Spec], results: list[Result], timeout_s: float) -> Check:
    """Each temperature-1e-40 request answered 200 with the text temperature 0 gives."""
    tiny = [(sp, r) for sp, r in zip(specs, results) if sp.tiny]
    wrong = []
    for i, (sp, r) in enumerate(tiny):
        body = {**json.loads(sp.raw), "temperature": 0, "stream": False}
        body.pop("stream_options", None)
        again = httpx.post(url + "/v1/completions", json=body, timeout=timeout_s)
        if judge(r) is not None or again.status_code != 200 or (
                again.json()["choices"][0]["text"] != r.text):
            wrong.append(i)
    return Check(f"temperature {TINY_TEMPERATURE:g}: succeeds, same text as temperature 0",
                 not wrong, f"{len(tiny) - len(wrong)}/{len(tiny)} right"
                 + (f"; wrong: {wrong[:5]}" if wrong else ""))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
