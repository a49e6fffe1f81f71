"""Operator table in CPU time: what each aten operator of a training step costs this thread.

    python scripts/bench.py --config configs/ablate.yaml --train.threads=1 --profile-cpu

``torch.profiler`` (``--profile``) reports wall time per operator. On a shared machine a
process is preempted mid-kernel, and the wait is charged to whichever operator was running:
long kernels most. On the 2-core machine at a load average of 10, the vocabulary log-softmax
of configs/ablate.yaml (2 ms of CPU) showed as 36 ms a call. Here each operator is timed with
the thread's CPU clock (``time.thread_time_ns``) around its kernel, from a
``TorchDispatchMode`` (below autograd, so the backward's operators are seen too; with one
thread the autograd engine runs them on this thread). The step's own CPU time minus the sum
over operators is what no kernel accounts for: Python, autograd bookkeeping and dispatch.
Each timed call also includes the mode's own Python call (~3-5 us): view-like operators
(``view``, ``t``, ``detach``) show it, and their total bounds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCpuTimer(TorchDispatchMode):
    """Per aten operator (its overload packet's name): calls and thread CPU nanoseconds."""

    def __init__(self):
        super().__init__()
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        dt = time.thread_time_ns() - t0
        name = func.overloadpacket.__name__
        self.ns[name] = self.ns.get(name, 0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1
        return out


def op_cpu_table(step: Callable[[], object], steps: int = 20, rows: int = 25) -> dict:
    """Run ``step`` ``steps`` times plain (its CPU and wall time per step), then ``steps``
    times under ``OpCpuTimer``; per-step numbers for the ``rows`` costliest operators."""
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        step()
    cpu_ms, wall_ms = ((time.thread_time() - c0) * 1e3 / steps,
                       (time.perf_counter() - w0) * 1e3 / steps)
    timer = OpCpuTimer()
    with timer:
        for _ in range(steps):
            step()
    kernels_ms = sum(timer.ns.values()) / 1e6 / steps
    top = sorted(timer.ns, key=timer.ns.get, reverse=True)[:rows]
    return {"steps": steps, "step_cpu_ms": cpu_ms, "step_wall_ms": wall_ms,
            "kernels_cpu_ms": kernels_ms, "calls_per_step": sum(timer.calls.values()) / steps,
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "ops": [{"op": k, "cpu_ms": timer.ns[k] / 1e6 / steps,
                     "calls": timer.calls[k] / steps,
                     "us_per_call": timer.ns[k] / 1e3 / timer.calls[k]} for k in top]}


def format_table(r: dict) -> str:
    lines = [f"per step, mean of {r['steps']}: CPU {r['step_cpu_ms']:.2f} ms (wall "
             f"{r['step_wall_ms']:.2f} ms, 1-min load average {r['loadavg']:.1f}); operators "
             f"{r['kernels_cpu_ms']:.2f} ms in {r['calls_per_step']:.0f} calls; outside them "
             f"{r['step_cpu_ms'] - r['kernels_cpu_ms']:.2f} ms",
             f"{'operator':52s} {'CPU ms':>8s} {'of ops':>6s} {'calls':>7s} {'us/call':>8s}"]
    for o in r["ops"]:
        share = o["cpu_ms"] / r["kernels_cpu_ms"]
        lines.append(f"{o['op'][:52]:52s} {o['cpu_ms']:8.3f} {share:6.1%} {o['calls']:7.1f} "
                     f"{o['us_per_call']:8.1f}")
    return "\n".join(lines)
