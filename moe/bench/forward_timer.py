"""Forward times inside real runs (the speculative benchmark's in-run costs,
moe/bench/speculative.py)."""

from __future__ import annotations

import time

from moe.inference.engine import Engine


class ForwardTimer:
    """Times an engine's forwards inside the real runs: wraps its ``forward`` and ``prefill``
    (instance attributes, so every call the engine's own methods make is seen) and sums, by
    the tokens per row of each forward (prefills apart), wall ms and this thread's CPU ms. On
    a shared machine the two differ: a forward's wall time includes the time the process
    waited for a core, CPU time does not (one torch thread: the thread's time is the work)."""

    def __init__(self, engine: Engine):
        self.reset()
        forward, prefill = engine.forward, engine.prefill
        inside = []

        def timed_forward(slots, tokens, n_valid=None):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = forward(slots, tokens, n_valid)
            if not inside:
                key = len(tokens[0])
                self.ms[key] = self.ms.get(key, 0.0) + 1e3 * (time.perf_counter() - t0)
                self.cpu_ms[key] = self.cpu_ms.get(key, 0.0) + 1e3 * (time.thread_time() - c0)
                self.calls[key] = self.calls.get(key, 0) + 1
            return out

        def timed_prefill(*args, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            inside.append(1)
            try:
                return prefill(*args, **kw)
            finally:
                inside.pop()
                self.prefill_ms += 1e3 * (time.perf_counter() - t0)
                self.prefill_cpu_ms += 1e3 * (time.thread_time() - c0)

        engine.forward, engine.prefill = timed_forward, timed_prefill

    def reset(self) -> None:
        self.ms: dict[int, float] = {}
        self.cpu_ms: dict[int, float] = {}
        self.calls: dict[int, int] = {}
        self.prefill_ms = self.prefill_cpu_ms = 0.0

    def total_ms(self, cpu: bool = False) -> float:
        if cpu:
            return sum(self.cpu_ms.values()) + self.prefill_cpu_ms
        return sum(self.ms.values()) + self.prefill_ms

    def mean_ms(self, tokens: int | None = None, cpu: bool = False) -> float:
        """Mean ms of a forward of ``tokens`` per row (None: every size but prefills)."""
        ms = self.cpu_ms if cpu else self.ms
        keys = list(ms) if tokens is None else [tokens]
        n = sum(self.calls.get(k, 0) for k in keys)
        return sum(ms.get(k, 0.0) for k in keys) / n if n else float("nan")
