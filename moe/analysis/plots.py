"""PNG drawing shared by sweep plots (moe/ablate/plots.py) and routing reports (moe/analysis/).

Figures are built with ``matplotlib.figure.Figure`` directly, so nothing here touches a GUI
backend or pyplot's global figure list: safe in tests, subprocesses and headless machines.
Functions take the numbers to draw; none reads a run folder or imports the code that makes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402


def figure(width: float = 6.4, height: float = 4.2, **kw) -> Figure:
    """A new figure, not registered with pyplot (inches, constrained layout)."""
    return Figure(figsize=(width, height), layout="constrained", **kw)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parent folders made), return the path."""
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
    fig = figure(5.2 * len(panels), 4.0)
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
    return save_png(fig, path)


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
    fig = figure(max(4.0, min(5.5, 1.2 + 0.35 * widest)) * cols, 0.8 + 2.6 * rows)
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
    return save_png(fig, path)
