"""The serving load test's load and invariants (moe/bench/serve_run.py runs them on a server).

The load (``plan``, ``run_load``): ``n`` requests in an order fixed by a seed, sent from
``clients`` concurrent clients (asyncio + httpx, one connection each): prompts cut from this
package's own source at random lengths, random ``max_tokens``, greedy or seeded sampling, some
streaming; a share malformed (broken JSON, a wrong type, an unknown field, a prompt longer
than the context, in turn: each must get a 4xx in OpenAI's error shape), a share of streams
the client closes after ``disconnect_after`` chunks, a few at ``temperature: 1e-40`` (must be
greedy). ``send`` records what the client saw (``Result``); ``judge`` says whether that was
right.

The figures: time to first token is the time from sending to a stream's first chunk with a
choice (the wait for a free slot included); inter-token latency the gaps between a stream's
chunks (one chunk is one token's text, except where the server holds back an incomplete UTF-8
character or a possible stop string); p50 and p99 by the nearest-rank rule (``percentile``).
The invariants are plain functions of measured numbers (``check_*``), each a ``Check``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import moe

ROOT = Path(moe.__file__).resolve().parents[1]  # where the moe package lives
TINY_TEMPERATURE = 1e-40  # below SAMPLING_EPS: the server must treat it as greedy
OK_STOP_CODES = (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful stop


@dataclass
class Settings:
    """Every knob of the load test (moe/cli/bench_serve.py's flags)."""

    run: str | None = None  # a run folder; None: a random model (``random_run``)
    config: str = str(ROOT / "configs" / "tiny.yaml")  # the random model's config
    overrides: list[str] = field(default_factory=list)  # and its --section.key=value
    requests: int = 200
    clients: int = 16
    seed: int = 0  # the load plan, and the random model's weights
    malformed: float = 0.05
    disconnect: float = 0.10
    tiny_temperature: float = 0.03
    stream: float = 0.5  # of the other well-formed requests
    disconnect_after: int = 2  # chunks read before a disconnecting client closes
    max_prompt_chars: int | None = None  # None: 3/8 of the context
    max_tokens: int | None = None  # None: half the context
    warmup: int = 32
    slots: int = 8
    threads: int = 0  # the server's torch threads (0: torch's default)
    max_waiting: int = 256
    settle_s: float = 5.0
    stop_timeout_s: float = 10.0
    rss_tolerance_mb: float = 50.0
    rss_tolerance_frac: float = 0.10
    request_timeout_s: float = 300.0
    startup_timeout_s: float = 300.0


# --- the load ------------------------------------------------------------------------------


@dataclass
class Spec:
    """One request: ``kind`` is ok, malformed or disconnect; ``raw`` is sent as the body."""

    kind: str
    raw: bytes
    stream: bool
    tiny: bool = False  # temperature 1e-40


def source_text() -> str:
    """This package's own Python source, ASCII only (so a prompt of n characters has at most
    n byte-level BPE tokens): the text prompts are cut from, the same on every checkout."""
    files = sorted((ROOT / "moe").glob("**/*.py"))
    return "".join(p.read_text().encode("ascii", "ignore").decode() for p in files)


def plan(s: Settings, n: int, seed: int, model: str, ctx: int, text: str) -> list[Spec]:
    """``n`` requests in a fixed order given ``seed``: shares of malformed, disconnecting and
    1e-40 requests (rounded), the rest greedy or seeded sampling, streaming with probability
    ``s.stream``."""
    rng = random.Random(seed)
    max_chars = s.max_prompt_chars or ctx * 3 // 8
    max_tokens = s.max_tokens or ctx // 2
    counts = {k: round(n * f) for k, f in (("malformed", s.malformed),
                                           ("disconnect", s.disconnect),
                                           ("tiny", s.tiny_temperature))}
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds += ["ok"] * (n - len(kinds))
    rng.shuffle(kinds)
    bad = [lambda b: json.dumps(b).encode()[:-9],  # broken JSON
           lambda b: json.dumps({**b, "max_tokens": str(b["max_tokens"])}).encode(),
           lambda b: json.dumps({**b, "frobnicate": 1}).encode(),
           lambda b: json.dumps({**b, "prompt": [1] * (ctx + 1)}).encode()]
    out, n_bad = [], 0
    for i, kind in enumerate(kinds[:n]):
        start = rng.randrange(len(text) - max_chars)
        body = {"model": model, "prompt": text[start:start + rng.randint(1, max_chars)],
                "max_tokens": rng.randint(1, max_tokens), "temperature": 0.0}
        stream = rng.random() < s.stream
        if rng.random() < 0.5:
            body.update(temperature=0.8, seed=i)
        if kind == "malformed":
            out.append(Spec(kind, bad[n_bad % len(bad)](body), False))
            n_bad += 1
            continue
        if kind == "tiny":
            body.update(temperature=TINY_TEMPERATURE)
            body.pop("seed", None)
        if kind == "disconnect":  # long, and no early stop: it is still running when cut off
            stream = True
            body.update(max_tokens=max_tokens, ignore_eos=True)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        out.append(Spec("ok" if kind == "tiny" else kind, json.dumps(body).encode(), stream,
                        tiny=kind == "tiny"))
    return out


@dataclass
class Result:
    """What the client saw of one request (``judge`` says whether it was right)."""

    kind: str
    stream: bool
    status: int | None = None
    finish_reason: str | None = None
    done: bool = False  # a stream's "data: [DONE]"
    closed_early: bool = False  # a disconnecting client closed it
    error_shape: bool = False  # {"error": {"message": str, "type": str, ...}}
    error: str | None = None  # transport error, error chunk, unreadable body
    tokens: int = 0  # usage.completion_tokens
    text: str = ""
    chunk_s: list[float] = field(default_factory=list)  # each choice chunk, from the send


async def send(client: httpx.AsyncClient, url: str, spec: Spec, disconnect_after: int) -> Result:
    res, t0 = Result(spec.kind, spec.stream), time.perf_counter()
    headers = {"content-type": "application/json"}
    try:
        if not spec.stream:
            r = await client.post(url, content=spec.raw, headers=headers)
            res.status = r.status_code
            _read_body(res, r.json())
            return res
        async with client.stream("POST", url, content=spec.raw, headers=headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                _read_body(res, json.loads(await r.aread()))
                return res
            async for line in r.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    res.done = True
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    res.error = f"error chunk: {chunk['error'].get('message')}"
                    break
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    res.chunk_s.append(time.perf_counter() - t0)
                    res.text += choice["text"]
                    res.finish_reason = choice["finish_reason"] or res.finish_reason
                if spec.kind == "disconnect" and len(res.chunk_s) >= disconnect_after:
                    res.closed_early = True  # leaving the block closes the connection
                    break
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _read_body(res: Result, body) -> None:
    err = body.get("error") if isinstance(body, dict) else None
    res.error_shape = (isinstance(err, dict) and isinstance(err.get("message"), str)
                       and isinstance(err.get("type"), str))
    if res.status == 200:
        res.finish_reason = body["choices"][0]["finish_reason"]
        res.text = body["choices"][0]["text"]
        res.tokens = body["usage"]["completion_tokens"]


async def run_load(url: str, specs: list[Spec], clients: int, disconnect_after: int,
                   timeout_s: float) -> tuple[list[Result], float]:
    """Send ``specs`` from ``clients`` concurrent workers; (results in plan order, wall s)."""
    results: list[Result | None] = [None] * len(specs)
    todo = iter(range(len(specs)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker():
            for i in todo:  # one event loop: the workers share the iterator safely
                results[i] = await send(client, url, specs[i], disconnect_after)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - t0


# --- the invariants ------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least q% of ``values`` at or
    below it (p50 of 1..100 is 50, p99 is 99); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def judge(r: Result) -> str | None:
    """Why ``r`` was answered wrongly, or None. Malformed: a 4xx in OpenAI's error shape.
    Well-formed: a 200 with a finish_reason (a stream: and [DONE]), or a stream its client
    closed after the chunks it wanted."""
    if r.kind == "malformed":
        ok = r.status is not None and 400 <= r.status < 500 and r.error_shape
        return None if ok else f"status {r.status}, error shape {r.error_shape}"
    if r.error is not None or r.status != 200:
        return f"status {r.status}: {r.error}"
    if r.closed_early:
        return None
    if r.finish_reason not in ("stop", "length"):
        return f"finish_reason {r.finish_reason!r}"
    return None if r.done or not r.stream else "no data: [DONE]"


def check_requests(results: list[Result]) -> list[Check]:
    """Every request judged right (``judge``), well-formed and malformed ones apart; the run
    passes the warm-up's and the load's results together."""
    out = []
    for name, kinds in (("well-formed requests: 200 with a finish_reason", ("ok", "disconnect")),
                        ("malformed requests: a 4xx in OpenAI's error shape", ("malformed",))):
        rs = [r for r in results if r.kind in kinds]
        bad = [(i, why) for i, r in enumerate(rs) if (why := judge(r)) is not None]
        detail = f"{len(rs) - len(bad)}/{len(rs)} right"
        if bad:
            detail += "; first wrong: " + "; ".join(f"#{i} {why}" for i, why in bad[:3])
        out.append(Check(name, not bad, detail))
    return out


def check_idle(waiting: float, running: float, health: str) -> Check:
    ok = waiting == 0 and running == 0 and health == "ok"
    return Check("after the load: nothing waiting or running, /health ok", ok,
                 f"moe_requests_waiting {waiting:g}, moe_requests_running {running:g}, "
                 f"/health {health}")


def rss_allowed_kb(warm_kb: int, s: Settings) -> float:
    """The growth tolerated: the larger of ``rss_tolerance_frac`` and ``rss_tolerance_mb``."""
    return max(warm_kb * s.rss_tolerance_frac, s.rss_tolerance_mb * 1024)


def check_rss(warm_kb: int, after_kb: int, s: Settings) -> Check:
    allowed = rss_allowed_kb(warm_kb, s)
    return Check("server memory flat (VmRSS after the load vs after the warm-up)",
                 after_kb - warm_kb <= allowed,
                 f"{warm_kb / 1024:.0f} -> {after_kb / 1024:.0f} MB "
                 f"({(after_kb - warm_kb) / 1024:+.1f} MB; allowed +{allowed / 1024:.0f} MB)")


def check_cut(steps: int, max_tokens: int, left: float, cut: int) -> Check:
    """Streams of ``max_tokens`` tokens cut off early: the engine must have stopped decoding
    them well before their end (fewer than ``max_tokens // 2`` steps in all) and left nothing
    waiting or running (``left``)."""
    ok = cut > 0 and steps < max_tokens // 2 and left == 0
    return Check("streams cut off stop decoding", ok,
                 f"{cut} cut off: {steps} engine steps until every slot was free (allowed "
                 f"< {max_tokens // 2}; to their end: {max_tokens}), {left:g} left running")


def check_stop(code: int | None, seconds: float, timeout_s: float) -> Check:
    ok = code in OK_STOP_CODES
    what = "still running (killed)" if code is None else f"exit code {code}"
    return Check(f"stops on one SIGTERM within {timeout_s:g} s", ok,
                 f"{what} after {seconds:.2f} s")
