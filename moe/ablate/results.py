"""A sweep's tables: results.csv (one row per run) and summary.md (mean ± std over seeds,
differences paired by seed with 95% intervals and verdicts: moe/ablate/stats.py)."""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path
from typing import Any

from moe.ablate.points import format_value, short_keys
from moe.ablate.stats import mean_interval, paired_comparisons, verdict

RESULT_COLUMNS = ["name", "status", "cached", "seed", "seed_index"]  # + grid keys, then:
STAT_COLUMNS = ["n_experts", "top_k", "expert_hidden", "n_shared_experts", "max_steps",
                "adjusted", "final_val_loss", "val_loss_se", "final_lm_loss", "drop_frac",
                "max_over_mean_load", "tokens_per_s", "total_params", "active_params",
                "wall_s", "run_dir", "same_as", "error"]


# ---------------------------------------------------------------------------------------------
# results.csv


def write_results(path: Path, rows: list[dict], grid_keys: list[str]) -> None:
    """One line per row: RESULT_COLUMNS, the grid keys, STAT_COLUMNS (None -> empty)."""
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
# summary.md


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
    """summary.md: one table line per grid point, then shared runs and failed runs."""
    short = short_keys(grid_keys)
    k0 = grid_keys[0]
    v0 = format_value(rows[0].get(k0)) if rows else ""
    deltas = paired_deltas(rows, grid_keys) if len({str(r.get(k0)) for r in rows}) > 1 else {}
    head = [short[k] for k in grid_keys] + ["runs ok", "val loss"] + (
        [f"Δ val vs {short[k0]}={v0} [95% CI]", "verdict"] if deltas else []) + [
        "drop frac", "max/mean load", "tokens/s", "active params", "total params", "adjusted"]
    lines = [
        "# Ablation summary", "",
        f"Mean ± std over seeds ({seeds} per point). val loss: final validation loss (eval "
        f"capacity factor of the config); "
        + (f"Δ val: val loss minus that of {short[k0]}={v0} with the same seed and other grid "
           "values (paired by seed), mean and Student-t 95% interval over seeds; verdict: "
           "better / worse when the interval excludes 0, else inconclusive; "
           if deltas else "")
        + "drop frac: training drop fraction, max/mean load: most loaded expert over the "
        "mean (worst layer), both means over the last 10% of logged steps; "
        f"tokens/s: median training throughput. Fixed-compute rule: {'on' if fixed else 'off'}.",
        "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in group_rows(rows, grid_keys).items():
        ok = [r for r in group if r.get("status") == "ok" and r.get("final_val_loss") is not None]
        cells = [format_value(v) for v in key] + [f"{len(ok)}/{len(group)}"]
        for metric, fmt in (("final_val_loss", "{:.4f}"), ("delta", "{:+.4f}"),
                            ("drop_frac", "{:.4f}"), ("max_over_mean_load", "{:.2f}"),
                            ("tokens_per_s", "{:.0f}")):
            if metric == "delta":
                if not deltas:
                    continue
                xs = [deltas[id(r)] for r in ok if id(r) in deltas]
                if key[0] == rows[0].get(k0) or not xs:  # the baseline itself
                    cells += ["-", "-"]
                else:
                    iv = mean_interval(xs)
                    cells += [iv.text(), verdict(iv)]
                continue
            else:
                xs = [float(r[metric]) for r in ok if r.get(metric) not in (None, "")]
            cells.append("-" if not xs else
                         " ± ".join(fmt.format(v) for v in mean_std(xs)).replace("± +", "± "))
        first = group[0]
        cells += [_count(first.get("active_params")), _count(first.get("total_params")),
                  first.get("adjusted") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    comps = paired_comparisons(rows, grid_keys)
    if comps:
        lines += ["", f"## Neighbouring {short[k0]} values, paired by seed", "",
                  "Δ val of each value against the one before it (the other grid values "
                  "fixed), mean and 95% interval over seeds:", "",
                  "| comparison | " + " | ".join(short[k] for k in grid_keys[1:])
                  + (" | " if grid_keys[1:] else "") + "seeds | Δ val [95% CI] | verdict |",
                  "|" + "---|" * (len(grid_keys) + 3)]
        for c in comps:
            fixed = "".join(f"{format_value(v)} | " for v in c.fixed)
            lines.append(f"| {short[k0]} {format_value(c.base)} → {format_value(c.arm)} | "
                         f"{fixed}{c.interval.n} | {c.interval.text()} | {c.verdict} |")
    lines += noise_lines(rows, grid_keys)
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


def noise_lines(rows: list[dict], grid_keys: list[str]) -> list[str]:
    """The noise budget: seed noise (std of the val loss over seeds, mean over grid points)
    and the validation set's sampling error (the standard error of one run's val loss over its
    validation batches, mean over runs: how far these windows' mean may sit from the mean over
    all windows). Every arm is evaluated on the same windows, so the sampling error is shared
    and cancels in paired differences: it bounds an absolute val loss, not a comparison."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("final_val_loss") is not None
          and not r.get("same_as")]
    spreads = [mean_std([float(r["final_val_loss"]) for r in g])[1]
               for g in group_rows(ok, grid_keys).values() if len(g) > 1]
    se = [float(r["val_loss_se"]) for r in ok if r.get("val_loss_se") not in (None, "")]
    if not spreads and not se:
        return []
    parts = []
    if spreads:
        parts.append(f"seed noise (std of val loss over seeds, mean over points) "
                     f"{statistics.fmean(spreads):.4f}")
    if se:
        parts.append(f"validation-set sampling error (standard error of a run's val loss "
                     f"over its validation batches, mean over runs; shared by every arm, so "
                     f"it cancels in the paired differences) {statistics.fmean(se):.4f}")
    return ["", "Noise: " + "; ".join(parts) + "."]


def _count(n: Any) -> str:
    if n in (None, ""):
        return "-"
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
