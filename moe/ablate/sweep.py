"""Running a sweep: one ``python -m moe.cli.train`` process per point, judged by its run folder."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from moe.ablate.points import Point, format_value, make_points, run_identity
from moe.ablate.results import summary_markdown, write_results
from moe.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TRAIN_MODULE = "moe.cli.train"


# ---------------------------------------------------------------------------------------------
# One point


def train_command(point: Point, config: str | None, nproc: int = 1,
                  python: str = sys.executable) -> list[str]:
    """The process that trains one point: ``python -m moe.cli.train``, under torchrun with
    ``nproc > 1`` (``torch.distributed.run -m`` runs a module on every rank)."""
    launcher = [python] if nproc <= 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cfg_args = [] if config is None else ["--config", str(config)]
    return launcher + ["-m", TRAIN_MODULE] + cfg_args + point.overrides


def train_env() -> dict[str, str]:
    """The sweep's environment with this checkout first on PYTHONPATH: the package is not
    necessarily installed, and the sweep may run from another folder than the checkout."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([path] if path else []))}


def run_point(point: Point, cmd: list[str], env: dict | None = None) -> tuple[int, float, int]:
    """Run the training process; its stdout and stderr are appended to <run>/train.log.

    Returns (exit status, wall seconds, the log's size before this attempt)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    with open(point.run_dir / "train.log", "a") as log:
        offset = log.tell()
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        # Same working folder as the sweep: relative paths (config, data.cache_dir) mean the same.
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0, offset


def log_tail(path: Path, n: int = 5, offset: int = 0) -> str:
    """The last ``n`` lines of a log written after byte ``offset``, joined with " | "."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    # Skip blank lines and the ^^^^ markers of Python tracebacks.
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not re.fullmatch(r"\s*[\^~]+\s*", ln)]
    return " | ".join(lines[-n:])[-1000:]


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """Final checkpoint at max_steps and a val row at max_steps in metrics.jsonl."""
    from moe.checkpoint import list_checkpoints
    from moe.train.metrics import read_metrics

    done = any(p.name == f"step_{max_steps:08d}" for p in list_checkpoints(run_dir))
    return done and any(r.get("step") == max_steps and "val_loss" in r
                        for r in read_metrics(run_dir))


def run_stats(run_dir: Path, max_steps: int) -> dict:
    """final_val_loss, final_lm_loss, drop_frac and max_over_mean_load (means over the last
    10% of logged train rows),
    tokens_per_s (median over logged train rows) from a run's metrics.jsonl."""
    from moe.train.metrics import read_metrics

    rows = read_metrics(run_dir)
    train = [r for r in rows if "lm_loss" in r]
    val = [r for r in rows if "val_loss" in r and r["step"] == max_steps]
    out: dict[str, Any] = {"final_val_loss": val[-1]["val_loss"] if val else None,
                           "val_loss_se": val[-1].get("val_loss_se") if val else None}
    if train:
        tail = train[-max(1, math.ceil(0.1 * len(train))):]
        out["final_lm_loss"] = train[-1]["lm_loss"]
        out["drop_frac"] = statistics.fmean(r["drop_frac"] for r in tail)
        # Most loaded expert / mean, worst layer of each step (before dropping), same rows.
        out["max_over_mean_load"] = statistics.fmean(r.get("max_over_mean_load", 1.0)
                                                     for r in tail)
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in train)
    return out


def params(cfg: Config) -> dict:
    """Total and active (per token) parameters, from moe.accounting.params (a meta-device build)."""
    from moe.accounting.params import count_params

    c = count_params(cfg.model)
    return {"total_params": c.total_params, "active_params": c.active_params}


def git_revision() -> str | None:
    """The checked-out commit, read from .git without running git (None when unavailable)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = ROOT / ".git" / head[5:]
            return ref.read_text().strip() if ref.is_file() else None
        return head
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The sweep


def job_env(threads: int, jobs: int) -> dict[str, str]:
    """The environment of one training process of a sweep running ``jobs`` at once, each on
    ``threads`` threads. Threads are fixed per job, not derived from ``jobs``, so a point's
    floating-point reductions (and so its numbers, bit for bit) do not depend on how many
    points run beside it. With several jobs, OpenMP workers sleep when idle instead of
    spin-waiting: a spinning worker of one job takes a core the other job needs."""
    env = {**train_env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if jobs > 1:
        env.update(OMP_WAIT_POLICY="PASSIVE", KMP_BLOCKTIME="0")
    return env


def default_jobs() -> int:
    """Points at once when the command line does not say: 2 where there are 2 cores or more.
    Measured on 2 cores (docs/ablations.md): 4 points of configs/ablate.yaml in 56.5 s as 2
    jobs of 1 thread, 77.2 s as 1 job of 2 threads (1.37x the points per hour)."""
    return 2 if default_threads(1) >= 2 else 1


def default_threads(jobs: int) -> int:
    """The cores this process may use, shared by ``jobs`` (at least one thread each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


def run_sweep(config: str | None, overrides: list[str], grid: dict[str, list], seeds: int,
              out: str | Path, fixed: bool = True, nproc: int = 1, plots: bool = True,
              python: str = sys.executable, echo: Callable[[str], None] = print,
              jobs: int = 1, threads: int | None = None) -> list[dict]:
    """Run (or resume) the sweep; write results.csv, summary.md and plots; return the rows.

    ``jobs`` points train at once, each on ``threads`` threads (default: the cores over
    ``jobs``); a point's results do not depend on ``jobs`` at a given ``threads``."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be >= 1")
    if jobs < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"--jobs={jobs} and --threads-per-job={threads} must be >= 1")
    threads = default_threads(jobs) if threads is None else threads
    points = make_points(config, overrides, grid, seeds, out, fixed, wandb_group=out.name)
    base = load_config(config, overrides)
    (out / "sweep.json").write_text(json.dumps({
        "argv": sys.argv, "config": config, "overrides": overrides,
        "grid": {k: [format_value(v) for v in vs] for k, vs in grid.items()}, "seeds": seeds,
        "fixed_compute": fixed, "nproc": nproc, "jobs": jobs, "threads_per_job": threads,
        "git_revision": git_revision(), "base_config": base.to_dict()}, indent=2) + "\n")

    rows: dict[int, dict] = {}  # point index -> its row, filled as points finish
    start = time.perf_counter()
    n = len(points)

    def write_tables() -> None:  # after every point, so an interrupted sweep has its results
        done = [rows[i] for i in sorted(rows)]
        write_results(out / "results.csv", done, list(grid))
        (out / "summary.md").write_text(summary_markdown(done, list(grid), seeds, fixed))

    def finish(i: int, row: dict) -> None:
        p = points[i]
        row.update(run_stats(Path(row["run_dir"]), p.cfg.train.max_steps))
        if row["status"] == "ok":
            echo(f"[{i + 1}/{n}] {p.name}: val loss {row['final_val_loss']:.4f}, drop "
                 f"{row.get('drop_frac', 0):.4f}, {row.get('tokens_per_s', 0):.0f} tok/s" +
                 ("" if row["cached"] or row["same_as"] else f", {row['wall_s']:.0f}s"))
        else:
            echo(f"[{i + 1}/{n}] {p.name}: FAILED: {row['error']}")
        rows[i] = row
        write_tables()

    first_of: dict[str, int] = {}  # run_identity -> the index of the point that trains it
    to_train: list[tuple[int, dict]] = []
    twins: list[tuple[int, dict, int]] = []
    for i, p in enumerate(points):
        row: dict[str, Any] = {"name": p.name, "seed": p.seed, "seed_index": p.seed_index,
                               "cached": False, "run_dir": str(p.run_dir), "error": "",
                               "same_as": "", **p.values}
        row["adjusted"] = ";".join(f"{k.split('.')[1]}={format_value(v)}"
                                   for k, v in p.adjusted.items())
        if p.cfg is None:
            row.update(status="failed", error=p.error)
            echo(f"[{i + 1}/{n}] {p.name}: failed before launch: {p.error}")
            rows[i] = row
            write_tables()
            continue
        mc = p.cfg.model
        row.update(n_experts=mc.n_experts, top_k=mc.top_k, expert_hidden=mc.expert_hidden,
                   n_shared_experts=mc.n_shared_experts, max_steps=p.cfg.train.max_steps,
                   **params(p.cfg))
        twin = first_of.setdefault(run_identity(p.cfg), i)
        if twin != i:  # the same capacities as an earlier point: its run is this one
            twins.append((i, row, twin))
        elif is_finished(p.run_dir, p.cfg.train.max_steps):
            record = p.run_dir / "ablate.json"
            prev = json.loads(record.read_text()) if record.is_file() else {}
            row.update(status="ok", cached=True, wall_s=prev.get("wall_s"))
            echo(f"[{i + 1}/{n}] {p.name}: finished before, skipped")
            finish(i, row)
        else:
            to_train.append((i, row))

    def train_one(i: int, row: dict) -> dict:
        p = points[i]
        cmd = train_command(p, config, nproc, python)
        rc, wall, offset = run_point(p, cmd, job_env(threads, jobs))
        # Judged by its final checkpoint and val row, not the exit status alone: a job that
        # used torch.distributed.checkpoint may abort at exit after finishing its work.
        ok = is_finished(p.run_dir, p.cfg.train.max_steps)
        row.update(status="ok" if ok else "failed", wall_s=round(wall, 2))
        if not ok:
            row["error"] = f"exit {rc}: {log_tail(p.run_dir / 'train.log', offset=offset)}"
        (p.run_dir / "ablate.json").write_text(json.dumps({
            "name": p.name, "status": row["status"], "rc": rc, "wall_s": row["wall_s"],
            "cmd": cmd, "threads": threads, "jobs": jobs}, indent=2) + "\n")
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads wait on processes
        futures = {}
        for i, row in to_train:
            echo(f"[{i + 1}/{n}] {points[i].name}: training ...")
            futures[pool.submit(train_one, i, row)] = i
        for future in as_completed(futures):
            finish(futures[future], future.result())
    for i, row, twin in twins:
        row.update({k: rows[twin].get(k) for k in ("status", "cached", "run_dir", "error")},
                   same_as=points[twin].name, wall_s=0.0)
        echo(f"[{i + 1}/{n}] {points[i].name}: same run as {points[twin].name} "
             f"(equal capacities), not trained again")
        finish(i, row)

    ordered = [rows[i] for i in sorted(rows)]
    echo(f"sweep of {n} runs: {time.perf_counter() - start:.0f}s ({jobs} at a time, "
         f"{threads} thread{'s' if threads > 1 else ''} each)")
    if plots:
        from moe.ablate.plots import sweep_plots
        from moe.train.metrics import read_metrics

        metrics = {r["run_dir"]: read_metrics(r["run_dir"]) for r in ordered
                   if r["status"] == "ok"}
        for path in sweep_plots(ordered, list(grid), out, metrics, echo=echo):
            echo(f"wrote {path}")
    return ordered
