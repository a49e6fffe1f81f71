"""Ablation sweeps: a grid over config keys x seeds, one ``scripts/train.py`` process per point.

    python scripts/ablate.py --config configs/ablate.yaml --seeds 2 --out runs/ablate \\
        --grid model.n_experts=1,4,16 model.capacity_factor=1.0,1.25,2.0,null

Layout of the sweep folder ``<out>``::

    sweep.json                 the command, grid, seeds and base config of the sweep
    runs/<name>/               one run folder per point (config.yaml, metrics.jsonl, checkpoints/,
                               train.log = the process's stdout and stderr, ablate.json)
    results.csv                one row per run (see RESULT_COLUMNS)
    summary.md                 mean +- std over seeds per grid point
    *.png                      plots (moe/plots.py)

A point's name is built from its grid values and seed, e.g.
``n_experts=4__capacity_factor=1.25__seed=0``, so re-running the same command finds the same
folders: a point whose run folder holds the final checkpoint and a val row at ``max_steps`` is
skipped, an interrupted one resumes from its last checkpoint (the trainer resumes exactly), and
a point that fails (non-zero exit, or a config error found before launching) is recorded with
``status=failed`` and the end of its log, and the sweep goes on.

Points that would train the same model share one run (``same_as`` in results.csv): two configs
that differ only in capacity factors giving the same capacities (``run_identity``). With one
expert and top-1, every capacity factor >= 1 is dropless; with 4 experts, top-2 and groups of
64 tokens, 2.0 gives 64 slots, as many as the group has tokens. Such runs are bit-identical, so
training them again would only spend time.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moe.config import Config, ConfigError, load_config, set_key

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"

# Keys the sweep sets itself; a grid over them would fight the sweep's bookkeeping.
RESERVED_KEYS = {"train.run_dir": "run folders are <out>/runs/<name>",
                 "train.seed": "use --seeds N (seed i is train.seed + i)"}


# ---------------------------------------------------------------------------------------------
# The grid


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["model.n_experts=1,4", "model.capacity_factor=1.0,null"]`` -> {key: [values]}.

    Values are YAML scalars like ``--section.key=value`` overrides (``null`` -> None), coerced
    to the key's type, so ``1`` for a float key becomes 1.0 and names stay stable. Raises
    ConfigError for bad syntax, a repeated key, an unknown key or a value of the wrong type.
    """
    import yaml

    if not items:
        raise ConfigError("the grid is empty: give --grid section.key=v1,v2 [...]")
    grid: dict[str, list] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"bad grid entry '{item}': write section.key=v1,v2,... "
                              f"(e.g. model.n_experts=1,4,16)")
        if key in grid:
            raise ConfigError(f"grid key '{key}' is given twice: list all its values once")
        if key in RESERVED_KEYS:
            raise ConfigError(f"grid key '{key}' is set by the sweep: {RESERVED_KEYS[key]}")
        parsed = []
        for raw in values.split(","):
            if not raw.strip():
                raise ConfigError(f"bad grid entry '{item}': empty value between commas")
            cfg = Config()
            set_key(cfg, key, yaml.safe_load(raw.strip()))  # unknown key / wrong type: raises
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value in parsed:
                raise ConfigError(f"grid key '{key}' lists the value {raw.strip()} twice")
            parsed.append(value)
        grid[key] = parsed
    return grid


def format_value(value: Any) -> str:
    """A grid value as it appears in point names and tables (None -> null)."""
    return json.dumps(value) if not isinstance(value, str) else value


def cli_value(value: Any) -> str:
    """A value as a ``--key=value`` override that YAML parses back to the same value."""
    return json.dumps(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """``model.n_experts`` -> ``n_experts``, unless two grid keys share the short name."""
    shorts = [k.split(".")[-1] for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}


def point_name(values: dict[str, Any], seed_index: int) -> str:
    short = short_keys(list(values))
    parts = [f"{short[k]}={format_value(v)}" for k, v in values.items()] + [f"seed={seed_index}"]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))


# ---------------------------------------------------------------------------------------------
# The fixed-compute rule


def fixed_compute(base: Config, values: dict[str, Any]) -> dict[str, Any]:
    """Adjustments that keep active parameters, compute per token and the token budget fixed.

    ``base`` is the resolved base config (YAML + the sweep's overrides), ``values`` one grid
    point's values. Keys the grid sets itself are never adjusted. Returns {dotted key: value}
    for the keys it changes (empty when nothing needs to change):

    1. Active FFN width: each token passes through ``top_k`` experts of ``expert_hidden`` units,
       so its expert compute and active expert parameters are proportional to
       ``W = top_k * expert_hidden``; W is held at the base value ``W0 = top_k0 * hidden0``.
       - ``n_experts < top_k0`` (e.g. ``n_experts=1``, the dense baseline): ``top_k = n_experts``.
       - whenever top_k differs from top_k0 (set above, or a grid key itself):
         ``expert_hidden = W0 / top_k``, a ConfigError when not an integer.
       More experts at fixed W add total parameters but no compute per token: the Switch
       Transformer comparison. (The router grows as d_model * n_experts: negligible.)
    2. Token budget: ``max_steps * batch_size * seq_len`` is held at the base value: when
       ``train.batch_size`` or ``data.seq_len`` is a grid key, ``max_steps = budget /
       (batch_size * seq_len)``, a ConfigError when not an integer. (A batch-size ramp, if
       configured, is left as it is.)
    """
    m0, t0 = base.model, base.train
    adjusted: dict[str, Any] = {}
    n_experts = values.get("model.n_experts", m0.n_experts)
    if "model.top_k" in values:
        top_k = values["model.top_k"]
    elif n_experts < m0.top_k:
        top_k = adjusted["model.top_k"] = n_experts
    else:
        top_k = m0.top_k
    if top_k != m0.top_k and "model.expert_hidden" not in values:
        width = m0.top_k * m0.expert_hidden
        if top_k <= 0 or width % top_k:
            raise ConfigError(f"fixed compute: active FFN width top_k * expert_hidden = {width} "
                              f"is not divisible by top_k={top_k}; pick another top_k or "
                              f"expert_hidden, or use --no-fixed-compute")
        adjusted["model.expert_hidden"] = width // top_k
    if ({"train.batch_size", "data.seq_len"} & set(values)) and "train.max_steps" not in values:
        budget = t0.max_steps * t0.batch_size * base.data.seq_len
        per_step = values.get("train.batch_size", t0.batch_size) * values.get("data.seq_len",
                                                                              base.data.seq_len)
        if budget % per_step:
            raise ConfigError(f"fixed compute: the token budget max_steps * batch_size * seq_len"
                              f" = {budget} is not a whole number of steps of {per_step} tokens;"
                              f" change the grid values or use --no-fixed-compute")
        adjusted["train.max_steps"] = budget // per_step
    return adjusted


def run_identity(cfg: Config) -> str:
    """What decides a run's numbers: the resolved config without its run folder, with the train
    and eval capacity factors (and min_capacity) replaced by the capacities per expert and
    capacity group they give (``moe.model.router.expert_capacity``). Equal identities train
    bit-identical models (the capacity is the only way the factors enter the computation)."""
    from moe.model.router import expert_capacity

    m = cfg.model
    tokens_in_group = m.capacity_group_seqs * cfg.data.seq_len
    d = cfg.to_dict()
    del d["train"]["run_dir"], d["model"]["min_capacity"]
    for key, cf in (("capacity_factor", m.capacity_factor),
                    ("eval_capacity_factor", m.eval_capacity_factor_resolved)):
        d["model"][key] = {"capacity": expert_capacity(tokens_in_group, m.top_k, m.n_experts,
                                                       cf, m.min_capacity)}
    d["model"]["router_weights"] = m.router_weights_resolved  # auto = what it resolves to
    return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Points


@dataclass
class Point:
    name: str
    values: dict[str, Any]  # grid key -> value
    seed_index: int
    seed: int
    run_dir: Path
    adjusted: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # given to scripts/train.py
    cfg: Config | None = None  # resolved config; None when it does not validate
    error: str | None = None


def make_points(config: str | None, overrides: list[str], grid: dict[str, list], seeds: int,
                out: Path, fixed: bool = True, wandb_group: str | None = None) -> list[Point]:
    """Every (grid point, seed) with its overrides and resolved config, in grid order."""
    base = load_config(config, overrides)
    user_keys = {o[2:].split("=", 1)[0] for o in overrides}
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        for i in range(seeds):
            name = point_name(values, i)
            p = Point(name, values, i, base.train.seed + i, out / "runs" / name)
            try:
                p.adjusted = fixed_compute(base, values) if fixed else {}
            except ConfigError as e:
                p.error = f"error: {e}"
            head = [] if "log.progress" in user_keys else ["--log.progress=false"]
            group = ([f"--log.wandb_group={wandb_group}"] if wandb_group and base.log.wandb !=
                     "disabled" and "log.wandb_group" not in user_keys else [])
            p.overrides = head + list(overrides) + group + [
                f"--{k}={cli_value(v)}" for k, v in {**values, **p.adjusted}.items()] + [
                f"--train.seed={p.seed}", f"--train.run_dir={p.run_dir}"]
            if p.error is None:
                try:
                    p.cfg = load_config(config, p.overrides)
                except ConfigError as e:
                    p.error = f"error: {e}"
            points.append(p)
    return points


def train_command(point: Point, config: str | None, nproc: int = 1,
                  python: str = sys.executable, script: Path = TRAIN_SCRIPT) -> list[str]:
    """The process that trains one point: scripts/train.py, or under torchrun with nproc > 1."""
    launcher = [python] if nproc <= 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cfg_args = [] if config is None else ["--config", str(config)]
    return launcher + [str(script)] + cfg_args + point.overrides


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def is_finished(run_dir: Path, max_steps: int) -> bool:
    """Final checkpoint at max_steps and a val row at max_steps in metrics.jsonl."""
    from moe.checkpoint import list_checkpoints

    done = any(p.name == f"step_{max_steps:08d}" for p in list_checkpoints(run_dir))
    return done and any(r.get("step") == max_steps and "val_loss" in r
                        for r in read_metrics(run_dir))


def run_stats(run_dir: Path, max_steps: int) -> dict:
    """final_val_loss, final_lm_loss, drop_frac (mean over the last 10% of logged train rows),
    tokens_per_s (median over logged train rows) from a run's metrics.jsonl."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if "lm_loss" in r]
    val = [r for r in rows if "val_loss" in r and r["step"] == max_steps]
    out: dict[str, Any] = {"final_val_loss": val[-1]["val_loss"] if val else None}
    if train:
        tail = train[-max(1, math.ceil(0.1 * len(train))):]
        out["final_lm_loss"] = train[-1]["lm_loss"]
        out["drop_frac"] = statistics.fmean(r["drop_frac"] for r in tail)
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in train)
    return out


def params(cfg: Config) -> dict:
    """Total and active (per token) parameters, from moe.accounting (a meta-device build)."""
    from moe.accounting import count_params

    c = count_params(cfg.model)
    return {"total_params": c.total_params, "active_params": c.active_params}


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


# ---------------------------------------------------------------------------------------------
# The sweep


RESULT_COLUMNS = ["name", "status", "cached", "seed", "seed_index"]  # + grid keys, then:
STAT_COLUMNS = ["top_k", "expert_hidden", "max_steps", "adjusted", "final_val_loss",
                "final_lm_loss", "drop_frac", "tokens_per_s", "total_params", "active_params",
                "wall_s", "run_dir", "same_as", "error"]


def run_sweep(config: str | None, overrides: list[str], grid: dict[str, list], seeds: int,
              out: str | Path, fixed: bool = True, nproc: int = 1, plots: bool = True,
              python: str = sys.executable, script: Path = TRAIN_SCRIPT,
              echo: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) the sweep; write results.csv, summary.md and plots; return the rows."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be >= 1")
    points = make_points(config, overrides, grid, seeds, out, fixed, wandb_group=out.name)
    base = load_config(config, overrides)
    (out / "sweep.json").write_text(json.dumps({
        "argv": sys.argv, "config": config, "overrides": overrides,
        "grid": {k: [format_value(v) for v in vs] for k, vs in grid.items()}, "seeds": seeds,
        "fixed_compute": fixed, "nproc": nproc, "git_revision": git_revision(),
        "base_config": base.to_dict()}, indent=2) + "\n")

    rows: list[dict] = []
    start = time.perf_counter()

    def write_tables() -> None:  # after every point, so an interrupted sweep has its results
        write_results(out / "results.csv", rows, list(grid))
        (out / "summary.md").write_text(summary_markdown(rows, list(grid), seeds, fixed))

    first_of: dict[str, dict] = {}  # run_identity -> the row of the point that trains it
    for i, p in enumerate(points, 1):
        row: dict[str, Any] = {"name": p.name, "seed": p.seed, "seed_index": p.seed_index,
                               "cached": False, "run_dir": str(p.run_dir), "error": "",
                               "same_as": "", **p.values}
        row["adjusted"] = ";".join(f"{k.split('.')[1]}={format_value(v)}"
                                   for k, v in p.adjusted.items())
        if p.cfg is None:
            row.update(status="failed", error=p.error)
            echo(f"[{i}/{len(points)}] {p.name}: failed before launch: {p.error}")
            rows.append(row)
            write_tables()
            continue
        mc, max_steps = p.cfg.model, p.cfg.train.max_steps
        row.update(top_k=mc.top_k, expert_hidden=mc.expert_hidden, max_steps=max_steps,
                   **params(p.cfg))
        record = p.run_dir / "ablate.json"
        twin = first_of.setdefault(run_identity(p.cfg), row)
        if twin is not row:  # the same capacities as an earlier point: its run is this one
            row.update({k: twin.get(k) for k in ("status", "cached", "run_dir", "error")},
                       same_as=twin["name"], wall_s=0.0)
            echo(f"[{i}/{len(points)}] {p.name}: same run as {twin['name']} "
                 f"(equal capacities), not trained again")
        elif is_finished(p.run_dir, max_steps):
            prev = json.loads(record.read_text()) if record.is_file() else {}
            row.update(status="ok", cached=True, wall_s=prev.get("wall_s"))
            echo(f"[{i}/{len(points)}] {p.name}: finished before, skipped")
        else:
            cmd = train_command(p, config, nproc, python, script)
            echo(f"[{i}/{len(points)}] {p.name}: training ...")
            rc, wall, offset = run_point(p, cmd)
            # Judged by its final checkpoint and val row, not the exit status alone: a job that
            # used torch.distributed.checkpoint may abort at exit after finishing its work.
            ok = is_finished(p.run_dir, max_steps)
            row.update(status="ok" if ok else "failed", wall_s=round(wall, 2))
            if not ok:
                row["error"] = f"exit {rc}: {log_tail(p.run_dir / 'train.log', offset=offset)}"
            record.write_text(json.dumps({"name": p.name, "status": row["status"], "rc": rc,
                                          "wall_s": row["wall_s"], "cmd": cmd}, indent=2) + "\n")
        row.update(run_stats(Path(row["run_dir"]), max_steps))
        if row["status"] == "ok":
            echo(f"    val loss {row['final_val_loss']:.4f}, drop {row.get('drop_frac', 0):.4f},"
                 f" {row.get('tokens_per_s', 0):.0f} tok/s" +
                 ("" if row["cached"] or row["same_as"] else f", {row['wall_s']:.0f}s"))
        else:
            echo(f"    FAILED: {row['error']}")
        rows.append(row)
        write_tables()

    echo(f"sweep of {len(points)} runs: {time.perf_counter() - start:.0f}s")
    if plots:
        from moe.plots import sweep_plots

        for path in sweep_plots(rows, list(grid), out, echo=echo):
            echo(f"wrote {path}")
    return rows


def write_results(path: Path, rows: list[dict], grid_keys: list[str]) -> None:
    cols = RESULT_COLUMNS + grid_keys + STAT_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: format_value(r.get(c)) if c in grid_keys else _csv(r.get(c))
                        for c in cols})


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


def read_results(path: str | Path) -> list[dict]:
    """results.csv back as dicts of strings (numbers parsed where possible)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = int(v) if re.fullmatch(r"-?\d+", v) else float(v)
            except (TypeError, ValueError):
                pass
    return rows


# ---------------------------------------------------------------------------------------------
# Summary table


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def group_rows(rows: list[dict], grid_keys: list[str]) -> dict[tuple, list[dict]]:
    """Grid point (tuple of values, in grid order) -> its rows, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in grid_keys), []).append(r)
    return groups


def paired_deltas(rows: list[dict], grid_keys: list[str]) -> dict[int, float]:
    """id(row) -> its final val loss minus that of the run with the same seed index and other
    grid values at the first value of the first grid key. Differences within a seed cancel the
    noise (data order, initialisation) that the seed shares across the grid. Rows without a
    seed index, or without a finished partner, get no delta."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("final_val_loss") is not None
          and r.get("seed_index") is not None]
    if not rows or not ok:
        return {}
    k0, rest = grid_keys[0], grid_keys[1:]
    v0 = rows[0].get(k0)
    base = {(tuple(r.get(k) for k in rest), r["seed_index"]): float(r["final_val_loss"])
            for r in ok if r.get(k0) == v0}
    out = {}
    for r in ok:
        b = base.get((tuple(r.get(k) for k in rest), r["seed_index"]))
        if b is not None:
            out[id(r)] = float(r["final_val_loss"]) - b
    return out


def summary_markdown(rows: list[dict], grid_keys: list[str], seeds: int, fixed: bool) -> str:
    short = short_keys(grid_keys)
    k0 = grid_keys[0]
    v0 = format_value(rows[0].get(k0)) if rows else ""
    deltas = paired_deltas(rows, grid_keys) if len({str(r.get(k0)) for r in rows}) > 1 else {}
    head = [short[k] for k in grid_keys] + ["runs ok", "val loss"] + (
        [f"Δ val vs {short[k0]}={v0}"] if deltas else []) + [
        "drop frac", "tokens/s", "active params", "total params", "adjusted"]
    lines = [
        "# Ablation summary", "",
        f"Mean ± std over seeds ({seeds} per point). val loss: final validation loss (eval "
        f"capacity factor of the config); "
        + (f"Δ val: val loss minus that of {short[k0]}={v0} with the same seed and other grid "
           "values (paired by seed); " if deltas else "")
        + "drop frac: training drop fraction, mean over the last 10% of logged steps; "
        f"tokens/s: median training throughput. Fixed-compute rule: {'on' if fixed else 'off'}.",
        "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in group_rows(rows, grid_keys).items():
        ok = [r for r in group if r.get("status") == "ok" and r.get("final_val_loss") is not None]
        cells = [format_value(v) for v in key] + [f"{len(ok)}/{len(group)}"]
        for metric, fmt in (("final_val_loss", "{:.4f}"), ("delta", "{:+.4f}"),
                            ("drop_frac", "{:.4f}"), ("tokens_per_s", "{:.0f}")):
            if metric == "delta":
                if not deltas:
                    continue
                xs = [deltas[id(r)] for r in ok if id(r) in deltas]
            else:
                xs = [float(r[metric]) for r in ok if r.get(metric) not in (None, "")]
            cells.append("-" if not xs else
                         " ± ".join(fmt.format(v) for v in mean_std(xs)).replace("± +", "± "))
        first = group[0]
        cells += [_count(first.get("active_params")), _count(first.get("total_params")),
                  first.get("adjusted") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    shared = [r for r in rows if r.get("same_as")]
    if shared:
        lines += ["", "Points with the same capacities as an earlier point share its run "
                  "(bit-identical training):", ""]
        lines += [f"- `{r['name']}` = `{r['same_as']}`" for r in shared]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.get('name', '?')}`: {r.get('error', '')}" for r in failed]
    return "\n".join(lines) + "\n"


def _count(n: Any) -> str:
    if n in (None, ""):
        return "-"
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


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
