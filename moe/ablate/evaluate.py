"""Ablations of a trained checkpoint at evaluation time: no training, one model, a grid of the
settings that only decide how it routes (what does dropping do to a trained MoE?).

    python scripts/ablate.py --run runs/tiny --out runs/tiny_eval \\
        --grid model.eval_capacity_factor=0.5,1.0,2.0,null \
               model.drop_policy=choice_major,token_major

The grid may hold only ``EVAL_KEYS``; every point evaluates the checkpoint's weights (built
again with the point's settings) on the run's own validation windows (``data.val_windows``,
or ``--windows``), the same windows for every point, and reports the val loss (per token), the
drop fraction (assignments dropped over routed, all MoE layers) and the most loaded expert
over the mean. Outputs in ``<out>``: ``results.csv``, ``summary.md`` and
``val_loss_vs_<first key>.png``. With the checkpoint's own settings the val loss is the one
the trainer logged at that step (tested).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from moe.ablate.points import cli_value, format_value, short_keys
from moe.config import ConfigError, apply_overrides

EVAL_KEYS = {
    "model.eval_capacity_factor": "slots per expert at evaluation (null: dropless)",
    "model.drop_policy": "which assignments an expert past capacity drops",
    "model.top_k": "experts per token (the router's weights are the trained ones)",
    "model.capacity_group_seqs": "sequences that compete for one capacity",
    "model.router_weights": "renormalised or raw top-k weights",
}


def check_eval_grid(grid: dict[str, list]) -> None:
    bad = [k for k in grid if k not in EVAL_KEYS]
    if bad:
        raise ConfigError(f"--run evaluates a trained checkpoint: its grid may only hold "
                          f"evaluation-time settings ({', '.join(EVAL_KEYS)}), not "
                          f"{', '.join(bad)} (those need training: drop --run)")


@torch.no_grad()
def evaluate_point(model: torch.nn.Module, batches) -> dict:
    """Token-weighted val loss, drop fraction and max/mean load of ``model`` on ``batches``."""
    from moe.model.loss import lm_loss
    from moe.model.moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router is not None]
    total, tokens, routed, kept, worst = 0.0, 0, 0.0, 0.0, 1.0
    for x, y in batches:
        total += float(lm_loss(model(x), y, reduction="sum"))
        tokens += y.numel()
        for m in layers:
            st = m.last_stats
            routed += float(st.tokens_per_expert.sum())
            kept += float(st.kept_per_expert.sum())
            worst = max(worst, st.max_over_mean_load())
    return {"val_loss": total / tokens, "drop_frac": 0.0 if not routed else 1 - kept / routed,
            "max_over_mean_load": worst, "tokens": tokens}


def eval_sweep(run: str | Path, grid: dict[str, list], out: str | Path,
               windows: int | None = None, batch_size: int | None = None,
               echo: Callable[[str], None] = print) -> list[dict]:
    """Evaluate ``run``'s newest good checkpoint at every grid point; write the tables."""
    from moe.checkpoint import load_model
    from moe.data import val_batches
    from moe.data.prepare import load_data
    from moe.model import build_model

    check_eval_grid(grid)
    loaded = load_model(run)
    if loaded.cfg.vision.enabled:
        raise ConfigError("--run on a vision run: evaluation-time ablations read text "
                          "validation windows only")
    base = loaded.cfg
    data = load_data(base)
    n = windows or base.data.val_windows
    batches = val_batches(data.val, base.data.seq_len, batch_size or base.train.micro_batch_size,
                          n)
    state = loaded.model.state_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(grid)
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(keys, values))
        row = {**point, "status": "ok", "error": ""}
        try:
            cfg = apply_overrides(copy.deepcopy(base),
                                  [f"--{k}={cli_value(v)}" for k, v in point.items()])
            cfg.validate()
        except ConfigError as e:
            row.update(status="failed", error=str(e))
            echo(f"{_name(point)}: refused: {e}")
            rows.append(row)
            continue
        model = build_model(cfg.model, "cpu")
        model.load_state_dict(state)
        row.update(evaluate_point(model.eval(), batches))
        echo(f"{_name(point)}: val loss {row['val_loss']:.4f}, drop {row['drop_frac']:.4f}")
        rows.append(row)
    (out / "eval_sweep.json").write_text(json.dumps({
        "run": str(run), "checkpoint": str(loaded.checkpoint), "step": loaded.step,
        "grid": {k: [format_value(v) for v in vs] for k, vs in grid.items()},
        "windows": n, "base": {k: format_value(_get(base, k)) for k in keys}}, indent=2) + "\n")
    _write_tables(out, rows, keys, base, loaded.step, n)
    _plot(out, rows, keys)
    return rows


def _get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _name(point: dict) -> str:
    return "__".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in point.items())


def _write_tables(out: Path, rows: list[dict], keys: list[str], base, step: int,
                  windows: int) -> None:
    cols = keys + ["status", "val_loss", "drop_frac", "max_over_mean_load", "tokens", "error"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: format_value(r.get(c)) if c in keys else r.get(c, "") for c in cols})
    short = short_keys(keys)
    trained = ", ".join(f"{short[k]}={format_value(_get(base, k))}" for k in keys)
    lines = ["# Evaluation-time ablation of one checkpoint", "",
             f"Step {step}, trained with {trained}; {windows} validation windows, the same "
             "for every row. drop frac: assignments dropped over routed, all MoE layers; "
             "max/mean: the most loaded expert over the mean, worst layer and batch.", "",
             "| " + " | ".join(short[k] for k in keys) + " | val loss | drop frac | max/mean |",
             "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        cells = [format_value(r[k]) for k in keys]
        if r["status"] != "ok":
            cells += ["refused", "-", "-"]
        else:
            cells += [f"{r['val_loss']:.4f}", f"{r['drop_frac']:.4f}",
                      f"{r['max_over_mean_load']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    refused = [r for r in rows if r["status"] != "ok"]
    lines += [""] + [f"- refused {_name({k: r[k] for k in keys})}: {r['error']}"
                     for r in refused]
    (out / "summary.md").write_text("\n".join(lines).rstrip() + "\n")


def _plot(out: Path, rows: list[dict], keys: list[str]) -> None:
    from moe.analysis.plots import lines_vs_x, x_order

    x_key, series_key = keys[0], (keys[1] if len(keys) > 1 else None)
    ok = [r for r in rows if r["status"] == "ok"]
    xs = x_order(r[x_key] for r in rows)
    series = {}
    for s in (x_order(r[series_key] for r in rows) if series_key else [None]):
        label = "" if s is None else f"{series_key.split('.')[-1]}={format_value(s)}"
        ys = []
        for x in xs:
            got = [r["val_loss"] for r in ok if r[x_key] == x and
                   (series_key is None or r[series_key] == s)]
            ys.append((sum(got) / len(got), 0.0) if got else None)
        series[label] = {"y": ys}
    lines_vs_x(xs, series, out / f"val_loss_vs_{x_key.split('.')[-1]}.png", x_key=x_key,
               ylabel="val loss", title="one checkpoint, evaluation-time settings")
