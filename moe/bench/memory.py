"""Peak memory and speed of forward + backward under each activation-checkpointing mode
(``train.activation_checkpointing`` none | full | selective); ``scripts/bench.py --ac``.

Each mode runs in fresh Python processes (``sys.executable -c``), so one mode's allocations
and high-water marks cannot leak into another's: the bench's ``Stepper`` (model, AdamW,
synthetic batches, as moe/bench/step.py) with the mode applied, then calls of ``forward_backward``
(all micro-batches of a global step; no clipping, no optimizer step), gradients freed after
each. Peak memory is that of one call after a warm-up call (which pays one-time costs: lazy
imports, kernel set-up):

- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call: the
  peak of live tensors the step adds (activations, gradients, temporaries).
- CPU: the peak resident set size minus the resident set before the call (Linux
  ``/proc/self/status`` VmHWM - VmRSS, the high-water mark reset first through
  ``/proc/self/clear_refs``), in a process started with ``MALLOC_MMAP_THRESHOLD_=65536``:
  glibc then maps every block of 64 KiB or more on its own and unmaps it when freed, so the
  resident set follows the live tensors. (With glibc's default threshold, which grows as
  memory is freed, freed blocks stay resident and the figure depends on allocation history:
  measured that way, selective came out below full.)

Both include the parameter gradients (the same in every mode) and the logits and
cross-entropy (outside the blocks, never checkpointed). Speed is measured in another fresh
process with the default allocator: tokens per step over the median forward + backward time
of ``steps`` calls after ``warmup``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MODES = ("none", "full", "selective")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure_mode(raw_cfg: dict, mode: str, steps: int, warmup: int) -> dict:
    """In this process: ``warmup`` then ``steps`` calls of ``forward_backward`` under ``mode``;
    the median time of the timed calls and the peak memory they add."""
    import torch

    from moe.bench.step import Stepper, sync
    from moe.config import from_dict
    from moe.device import autocast_dtype, resolve_device, set_threads

    cfg = from_dict(raw_cfg)
    cfg.train.activation_checkpointing = mode
    threads = set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    s = Stepper(cfg, cfg.model, device, autocast_dtype(device, cfg.train.dtype))

    for _ in range(warmup):
        s.timed_forward_backward()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        base = _status_bytes("VmRSS")
    times = [s.timed_forward_backward() for _ in range(steps)]
    out = {"mode": mode, "device": str(device), "threads": threads, "steps": steps,
           "fwd_bwd_s_median": statistics.median(times),
           "tokens_per_s": s.tokens_per_step / statistics.median(times),
           "loss": float(s.last_loss)}
    if device.type == "cuda":
        out["measure"] = "torch.cuda.max_memory_allocated - allocated before the call"
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
        out["measure"] = f"VmHWM - VmRSS before the call (MALLOC_MMAP_THRESHOLD_={mmap})"
        out["peak_mib"] = (_status_bytes("VmHWM") - base) / 2**20
        out["rss_before_mib"] = base / 2**20
    return out


def _child() -> None:
    req = json.loads(sys.stdin.read())
    print(json.dumps(measure_mode(req["config"], req["mode"], req["steps"], req["warmup"])))


def _run_child(req: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", "from moe.bench.memory import _child; _child()"],
                          input=json.dumps(req), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory bench, mode {req['mode']}, failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory_bench(cfg, steps: int = 5, warmup: int = 1,
                     log: Callable[[str], None] | None = None) -> dict:
    """Each mode of ``MODES`` in its own fresh process; returns {mode: result} plus ratios."""
    log = log or (lambda s: None)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    res = {}
    for mode in MODES:
        mem = _run_child({"config": cfg.to_dict(), "mode": mode, "steps": 1, "warmup": 1},
                         dict(env, MALLOC_MMAP_THRESHOLD_="65536"))
        speed = _run_child({"config": cfg.to_dict(), "mode": mode, "steps": steps,
                            "warmup": warmup}, env)
        res[mode] = {**speed, **{k: v for k, v in mem.items() if "mib" in k or k == "measure"}}
        res[mode]["loss_memory_run"] = mem["loss"]
        log(f"{mode:10s} peak {res[mode]['peak_mib']:8.1f} MiB   "
            f"{res[mode]['tokens_per_s']:8.0f} tokens/s (fwd+bwd)   "
            f"loss {res[mode]['loss']:.6f}")
    none = res["none"]
    for mode in MODES:
        r = res[mode]
        r["peak_vs_none"] = r["peak_mib"] / none["peak_mib"] if none["peak_mib"] else None
        r["speed_vs_none"] = r["tokens_per_s"] / none["tokens_per_s"]
    return {"modes": res, "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
            "measure": none["measure"], "steps": steps, "warmup": warmup}
