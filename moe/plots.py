"""PNG plots for sweeps and routing diagnostics (matplotlib, Agg canvas, no pyplot state).

Figures are built with ``matplotlib.figure.Figure`` directly, so nothing here touches a GUI
backend or pyplot's global figure list: safe in tests, subprocesses and headless machines.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def _fig(width: float = 6.4, height: float = 4.2, **kw) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", **kw)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Categorical x axes: numbers ascending, then text, then null ("dropless" for capacity factors)


def x_order(values) -> list:
    vals = list(dict.fromkeys(values))
    nums = sorted(v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool))
    rest = [v for v in vals if v is not None and v not in nums]
    return nums + rest + ([None] if None in vals else [])


def x_label(value: Any, key: str = "") -> str:
    if value is None:
        return "dropless" if "capacity" in key else "null"
    return json.dumps(value) if not isinstance(value, str) else value


def lines_vs_x(x_values: Sequence, series: dict[str, dict], path: str | Path, *, x_key: str = "",
               xlabel: str = "", ylabel: str = "", title: str = "", logy: bool = False,
               panels: Sequence[tuple[str, str, bool]] | None = None) -> Path:
    """One line per series over categorical x values.

    series: label -> {metric: [(mean, std) or None per x value]}; ``panels`` lists
    (metric, ylabel, logy) for one subplot each (default: one panel, metric "y").
    """
    panels = panels or [("y", ylabel, logy)]
    fig = _fig(5.2 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    xs = list(range(len(x_values)))
    for ax, (metric, yl, ly) in zip(axes, panels):
        for label, data in series.items():
            pts = [(x, v) for x, v in zip(xs, data.get(metric, [])) if v is not None]
            if not pts:
                continue
            px = [p[0] for p in pts]
            mean = [p[1][0] for p in pts]
            std = [p[1][1] for p in pts]
            # On a log axis a bar below a positive mean would dive into the negative decades:
            # clip the lower bar at 0 for non-negative data (KL, losses, fractions).
            low = [min(s, m) if ly and m >= 0 else s for m, s in zip(mean, std)]
            ax.errorbar(px, mean, yerr=[low, std] if any(std) else None, marker="o",
                        capsize=3, label=label)
        ax.set_xticks(xs, [x_label(v, x_key) for v in x_values])
        ax.set_xlabel(xlabel or x_key)
        ax.set_ylabel(yl)
        if ly:
            ax.set_yscale("symlog", linthresh=1e-6)
            if all(v[0] >= 0 for d in series.values() for v in d.get(metric, []) if v):
                ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if len(series) > 1 or (series and next(iter(series)) != ""):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def heatmaps(mats: dict[str, Any], path: str | Path, *, xlabel: str = "expert",
             ylabel: str = "layer", title: str = "", cbar: str = "",
             row_labels: Sequence[str] | None = None, annotate: bool = True,
             cmap: str = "viridis", center: float | None = None) -> Path:
    """One heatmap per entry (2-D lists/arrays: rows = layers, columns = experts)."""
    import numpy as np

    n = len(mats)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    widest = max(np.asarray(m).shape[1] for m in mats.values())
    fig = _fig(max(4.0, min(5.5, 1.2 + 0.35 * widest)) * cols, 0.8 + 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, m) in zip(axes, mats.items()):
        m = np.asarray(m, dtype=float)
        kw = {}
        if center is not None:
            span = max(1e-12, float(np.nanmax(np.abs(m - center))))
            kw = {"vmin": center - span, "vmax": center + span}
        im = ax.imshow(m, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        labels = row_labels if row_labels and len(row_labels) == m.shape[0] else None
        ax.set_yticks(range(m.shape[0]), labels or [str(i) for i in range(m.shape[0])])
        step = max(1, m.shape[1] // 16)
        ax.set_xticks(range(0, m.shape[1], step))
        if annotate and m.size <= 96:
            mid = (np.nanmax(m) + np.nanmin(m)) / 2
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if v < mid else "k")
        fig.colorbar(im, ax=ax, label=cbar, shrink=0.9)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Sweep plots


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
            vals.append(None if not got else
                        (statistics.fmean(got), statistics.stdev(got) if len(got) > 1 else 0.0))
        series[_series_label(series_key, s)] = {"y": vals}
    return lines_vs_x(xs, series, path, x_key=x_key, ylabel=ylabel, title=title)


def _curves(run_dir: str) -> tuple[dict, dict]:
    from moe.ablate import read_metrics

    train, val = {}, {}
    for r in read_metrics(Path(run_dir)):
        if "lm_loss" in r:
            train[r["step"]] = r["lm_loss"]
        elif "val_loss" in r:
            val[r["tokens"]] = r["val_loss"]
    return train, val


def loss_curves(rows: list[dict], grid_keys: list[str], path: str | Path) -> Path:
    """Train LM loss vs step and val loss vs tokens, one line per grid point (seed mean)."""
    from moe.ablate import group_rows

    series_key, x_key = sweep_axes(grid_keys)
    series_vals = x_order(r.get(series_key) for r in rows) if series_key else [None]
    x_vals = x_order(r.get(x_key) for r in rows)
    styles = ["-", "--", ":", "-."]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = _fig(11, 4.4)
    ax_train, ax_val = fig.subplots(1, 2)
    for key, group in group_rows(_ok(rows), grid_keys).items():
        vals = dict(zip(grid_keys, key))
        curves = [_curves(r["run_dir"]) for r in group]
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
    return _save(fig, path)


def expert_load_heatmap(rows: list[dict], grid_keys: list[str], path: str | Path) -> Path | None:
    """Per layer x per expert share of routed tokens at the final logged step: one subplot per
    series value (n_experts), from its first successful run at the lowest x (capacity factor)."""
    from moe.ablate import read_metrics

    series_key, x_key = sweep_axes(grid_keys)
    x_vals = x_order(r.get(x_key) for r in rows)
    chosen: dict = {}
    for r in sorted(_ok(rows), key=lambda r: (x_vals.index(r.get(x_key)),
                                              r.get("seed_index", 0))):
        chosen.setdefault(r.get(series_key) if series_key else None, r)
    mats = {}
    for s in x_order(chosen):
        r = chosen[s]
        train = [m for m in read_metrics(Path(r["run_dir"])) if m.get("layers")]
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


def sweep_plots(rows: list[dict], grid_keys: list[str], out: str | Path,
                echo: Callable[[str], None] = print) -> list[Path]:
    """All sweep plots; a plot that cannot be drawn is reported and skipped."""
    out = Path(out)
    jobs = [
        ("val_loss_vs_capacity.png", lambda p: metric_vs_x(
            rows, grid_keys, "final_val_loss", p, "final val loss", "val loss (mean ± std)")),
        ("drop_vs_capacity.png", lambda p: metric_vs_x(
            rows, grid_keys, "drop_frac", p, "train drop fraction",
            "dropped token-expert assignments")),
        ("loss_curves.png", lambda p: loss_curves(rows, grid_keys, p)),
        ("expert_load_heatmap.png", lambda p: expert_load_heatmap(rows, grid_keys, p)),
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
