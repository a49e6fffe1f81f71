"""The sweep's PNG plots, drawn from its result rows and its runs' metrics.jsonl rows.

``metrics`` maps a row's ``run_dir`` to the rows of that run's metrics.jsonl (``run_sweep``
reads them with ``moe.train.metrics.read_metrics``); nothing here reads a run folder. The drawing
itself (Agg canvas, categorical x axes) is ``moe.analysis.plots``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

from moe.ablate.points import format_value
from moe.ablate.results import group_rows, mean_std
from moe.ablate.stats import paired_comparisons
from moe.analysis.plots import figure, heatmaps, lines_vs_x, save_png, x_label, x_order


def sweep_axes(grid_keys: list[str]) -> tuple[str | None, str]:
    """(series key, x key): n_experts lines over capacity factor when both are in the grid,
    else the first grid key as the series and the second as the x axis."""
    if "model.n_experts" in grid_keys and "model.capacity_factor" in grid_keys:
        return "model.n_experts", "model.capacity_factor"
    if len(grid_keys) == 1:
        return None, grid_keys[0]
    return grid_keys[0], grid_keys[1]


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("final_val_loss") is not None]


def _series_label(key: str | None, value: Any) -> str:
    return "" if key is None else f"{key.split('.')[-1]}={x_label(value)}"


def metric_vs_x(rows: list[dict], grid_keys: list[str], metric: str, path: str | Path,
                ylabel: str, title: str) -> Path:
    """Mean +- std over seeds (and over grid keys beyond the first two) of ``metric``."""
    series_key, x_key = sweep_axes(grid_keys)
    ok = _ok(rows)
    xs = x_order(r.get(x_key) for r in rows)
    series = {}
    for s in x_order(r.get(series_key) for r in rows) if series_key else [None]:
        vals = []
        for x in xs:
            got = [float(r[metric]) for r in ok if r.get(x_key) == x and r.get(metric) is not None
                   and (series_key is None or r.get(series_key) == s)]
            vals.append(mean_std(got) if got else None)
        series[_series_label(series_key, s)] = {"y": vals}
    return lines_vs_x(xs, series, path, x_key=x_key, ylabel=ylabel, title=title)


def _curves(metrics: list[dict]) -> tuple[dict, dict]:
    """({step: train LM loss}, {tokens: val loss}) from one run's metrics rows."""
    train, val = {}, {}
    for r in metrics:
        if "lm_loss" in r:
            train[r["step"]] = r["lm_loss"]
        elif "val_loss" in r:
            val[r["tokens"]] = r["val_loss"]
    return train, val


def loss_curves(rows: list[dict], grid_keys: list[str], path: str | Path,
                metrics: Mapping[str, list[dict]]) -> Path:
    """Train LM loss vs step and val loss vs tokens, one line per grid point (seed mean)."""
    series_key, x_key = sweep_axes(grid_keys)
    series_vals = x_order(r.get(series_key) for r in rows) if series_key else [None]
    x_vals = x_order(r.get(x_key) for r in rows)
    styles = ["-", "--", ":", "-."]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = figure(11, 4.4)
    ax_train, ax_val = fig.subplots(1, 2)
    for key, group in group_rows(_ok(rows), grid_keys).items():
        vals = dict(zip(grid_keys, key))
        curves = [_curves(metrics.get(r["run_dir"], [])) for r in group]
        label = ", ".join(f"{k.split('.')[-1]}={x_label(v, k)}" for k, v in vals.items())
        si = series_vals.index(vals.get(series_key)) if series_key else 0
        xi = x_vals.index(vals.get(x_key))
        style = {"color": colors[si % len(colors)], "linestyle": styles[xi % len(styles)],
                 "linewidth": 1.2}
        for ax, idx in ((ax_train, 0), (ax_val, 1)):
            common = sorted(set.intersection(*(set(c[idx]) for c in curves)))
            if common:
                ys = [statistics.fmean(c[idx][s] for c in curves) for s in common]
                ax.plot(common, ys, label=label, marker="o" if len(common) < 4 else None,
                        markersize=3, **style)
    ax_train.set(xlabel="step", ylabel="train LM loss", title="training loss (seed mean)")
    ax_val.set(xlabel="tokens", ylabel="val loss", title="validation loss (seed mean)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_train.set_yscale("log")
    ax_val.legend(fontsize=6, ncol=2)
    return save_png(fig, path)


def expert_load_heatmap(rows: list[dict], grid_keys: list[str], path: str | Path,
                        metrics: Mapping[str, list[dict]]) -> Path | None:
    """Per layer x per expert share of routed tokens at the final logged step: one subplot per
    series value (n_experts), from its first successful run at the lowest x (capacity factor)."""
    series_key, x_key = sweep_axes(grid_keys)
    x_vals = x_order(r.get(x_key) for r in rows)
    chosen: dict = {}
    for r in sorted(_ok(rows), key=lambda r: (x_vals.index(r.get(x_key)),
                                              r.get("seed_index", 0))):
        chosen.setdefault(r.get(series_key) if series_key else None, r)
    mats = {}
    for s in x_order(chosen):
        r = chosen[s]
        train = [m for m in metrics.get(r["run_dir"], []) if m.get("layers")]
        if not train:
            continue
        layers = sorted(train[-1]["layers"].items(), key=lambda kv: int(kv[0]))
        m = [[c / max(1, sum(v["tokens_per_expert"])) for c in v["tokens_per_expert"]]
             for _, v in layers]
        title = (f"{_series_label(series_key, s)} ({x_key.split('.')[-1]}="
                 f"{x_label(r.get(x_key), x_key)}, step {train[-1]['step']})").lstrip()
        mats[title] = (m, [k for k, _ in layers])
    if any(len(m[0]) > 1 for m, _ in mats.values()):  # one expert: nothing to see
        mats = {k: v for k, v in mats.items() if len(v[0][0]) > 1}
    if not mats:
        return None
    labels = next(iter(mats.values()))[1]
    return heatmaps({k: m for k, (m, _) in mats.items()}, path, cbar="share",
                    title="share of routed tokens per expert (1/E = balanced)",
                    row_labels=labels, ylabel="MoE layer")


def paired_deltas_plot(rows: list[dict], grid_keys: list[str], path: str | Path) -> Path | None:
    """Each neighbouring comparison of the first grid key (``paired_comparisons``): the mean
    paired Δ val loss with its 95% interval as an error bar, against a line at 0; green
    better, red worse, grey inconclusive. None when there is nothing to compare."""
    comps = [c for c in paired_comparisons(rows, grid_keys) if c.interval.n > 1]
    if not comps:
        return None
    colors = {"better": "tab:green", "worse": "tab:red", "inconclusive": "tab:gray"}
    short = grid_keys[0].split(".")[-1]
    fig = figure(max(5.5, 1.1 * len(comps) + 2), 4.0)
    ax = fig.subplots()
    for x, c in enumerate(comps):
        iv = c.interval
        ax.errorbar([x], [iv.estimate], yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]],
                    marker="o", capsize=4, color=colors[c.verdict])
    labels = [f"{format_value(c.base)}→{format_value(c.arm)}"
              + "".join(f"\n{format_value(v)}" for v in c.fixed) for c in comps]
    ax.set_xticks(range(len(comps)), labels, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel=short, ylabel="Δ val loss (arm − base)",
           title=f"paired by seed: mean, 95% CI ({comps[0].interval.n} seeds)")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def sweep_plots(rows: list[dict], grid_keys: list[str], out: str | Path,
                metrics: Mapping[str, list[dict]],
                echo: Callable[[str], None] = print) -> list[Path]:
    """All sweep plots; a plot that cannot be drawn is reported and skipped."""
    out = Path(out)
    jobs = [
        ("val_loss_vs_capacity.png", lambda p: metric_vs_x(
            rows, grid_keys, "final_val_loss", p, "final val loss", "val loss (mean ± std)")),
        ("drop_vs_capacity.png", lambda p: metric_vs_x(
            rows, grid_keys, "drop_frac", p, "train drop fraction",
            "dropped token-expert assignments")),
        ("loss_curves.png", lambda p: loss_curves(rows, grid_keys, p, metrics)),
        ("expert_load_heatmap.png", lambda p: expert_load_heatmap(rows, grid_keys, p, metrics)),
        ("paired_deltas.png", lambda p: paired_deltas_plot(rows, grid_keys, p)),
    ]
    written = []
    for name, draw in jobs:
        try:
            path = draw(out / name)
        except Exception as e:  # a plot must never lose the sweep's results
            echo(f"warning: could not draw {name}: {type(e).__name__}: {e}")
            continue
        if path is not None:
            written.append(path)
    return written
