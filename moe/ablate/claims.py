"""The MoE literature's claims, checked on a laptop: each claim is data (a source, a sweep, the
metric and the direction it predicts), run as an ablation sweep (moe/ablate/sweep.py) and judged
by paired differences with 95% intervals (moe/ablate/stats.py).

    python scripts/claims.py --out runs/claims                 # every claim (about 1 h 20)
    python scripts/claims.py switch_more_experts --quick --out /tmp/c    # a smoke run

A claim's checks compare two values of its one grid key, paired by seed (every arm of a seed
sees the same data order, validation windows and initial values of the parameters it shares:
moe/model/init.py initialises by name). A check expects the arm's metric minus the base's to
be ``lower`` or ``higher`` than 0 (the interval must exclude 0 on that side: *agrees*; on the
other side: *disagrees*), or ``no_worse`` / ``no_better`` within a ``margin`` (agrees when the
whole interval is on the right side of the margin, disagrees when it excludes 0 on the wrong
side). A ``zero`` check reads one arm alone: every seed's value within ``margin`` of 0
(float noise) agrees, one beyond it disagrees. A claim agrees when every check agrees,
disagrees when one disagrees, and is inconclusive otherwise. Outputs: ``<out>/<claim>/``
(the sweep), ``<out>/report.md`` and ``<out>/claims.json`` (per claim: name, verdict,
estimate, ci_low, ci_high, wall_s, checks).

Claims are small-scale replications: a 64-wide, 2-layer model for 1-2 M tokens cannot show
what a paper saw at billions of tokens, and an *inconclusive* or *disagrees* here says so about
this scale, with the numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe.ablate.points import format_value, parse_grid
from moe.ablate.stats import Interval, mean_interval
from moe.ablate.sweep import run_sweep

ABLATE = "configs/ablate.yaml"
# --quick: the same claims at a smoke-test size (checks the machinery, decides nothing).
QUICK = ["--train.max_steps=24", "--train.eval_every=24", "--train.ckpt_every=24",
         "--train.warmup_steps=4", "--data.val_windows=32", "--log.log_every=4"]


def loss_spike(run_dir: str | Path) -> float:
    """The largest rise of the training LM loss above its running minimum (nats): 0 for a
    loss that only falls, large for a run that spikes or diverges (inf if it went non-finite)."""
    from moe.train.metrics import read_metrics

    low, worst = math.inf, 0.0
    for r in read_metrics(run_dir):
        if "lm_loss" not in r:
            continue
        loss = r["lm_loss"]
        if loss is None or not math.isfinite(loss):
            return math.inf
        low = min(low, loss)
        worst = max(worst, loss - low)
    return worst


def batch_kl(run_dir: str | Path, prompts: int = 4, draws: int = 6) -> float:
    """How much a prompt's next-token distribution depends on its batch-mates when the run's
    model serves a batch (``moe.analysis.batch.served_batch_kl``: its own batched forward at
    its eval capacity factor, groups of ``model.capacity_group_seqs`` sequences; mean KL in
    nats): ``prompts`` validation windows, each with ``draws`` draws of batch-mates from
    other validation windows."""
    from moe.analysis import val_windows
    from moe.analysis.batch import served_batch_kl
    from moe.checkpoint import load_model
    from moe.data import prepare_data

    run = load_model(run_dir)
    windows = val_windows(prepare_data(run.cfg), run.cfg.data.seq_len, 512)
    return served_batch_kl(run.model, windows[:prompts], windows[prompts:], draws)


# The KL that counts as float noise in ``batch_kl_log10`` (dropless runs measured 1e-18 to
# 1e-17 nats; capacity 1.25, 1e-4 to 1e-2).
KL_FLOOR = 1e-12


def batch_kl_log10(run_dir: str | Path) -> float:
    """log10(``batch_kl`` + 1e-12): how many orders of magnitude the batch dependence is above
    float noise (-12 for a dropless model). On this scale the seeds' values spread by tenths,
    where the KL itself spreads by its own size, so a few seeds decide a paired difference."""
    return math.log10(run_metric("batch_kl", run_dir) + KL_FLOOR)


# A metric is a column of the sweep's rows, or a function of a run folder.
RUN_METRICS: dict[str, Callable[[str | Path], float]] = {"loss_spike": loss_spike,
                                                         "batch_kl": batch_kl,
                                                         "batch_kl_log10": batch_kl_log10}
_run_metric_cache: dict[tuple, float] = {}


def run_metric(metric: str, run_dir: str | Path) -> float:
    """``RUN_METRICS[metric](run_dir)``, computed once per run folder and metric (two checks
    may read one metric; a folder's metric is a fixed function of its files, keyed here by
    its metrics.jsonl's modification time)."""
    log = Path(run_dir) / "metrics.jsonl"
    key = (metric, str(Path(run_dir).resolve()), log.stat().st_mtime_ns if log.exists() else None)
    if key not in _run_metric_cache:
        _run_metric_cache[key] = RUN_METRICS[metric](run_dir)
    return _run_metric_cache[key]


@dataclass(frozen=True)
class Check:
    metric: str  # "final_val_loss", "max_over_mean_load", ... or a RUN_METRICS name
    base: object
    arm: object
    expect: str  # lower | higher | no_worse | no_better (arm - base) | zero (arm alone)
    # no_worse / no_better: how much is "no"; zero: the float noise allowed (metric's unit)
    margin: float = 0.0


@dataclass(frozen=True)
class Claim:
    name: str
    source: str
    statement: str
    setting: str
    key: str  # the one grid key
    values: tuple
    checks: tuple[Check, ...]
    config: str = ABLATE
    overrides: tuple[str, ...] = ()
    seeds: int = 3
    # More overrides for one value's runs, e.g. expert choice needs model.balance=none:
    # ((value, ("--model.balance=none",)), ...).
    arm_overrides: tuple = ()
    fixed_compute: bool = True
    budget_min: float = 15.0
    quick_seeds: int = 2


CLAIMS: tuple[Claim, ...] = (
    Claim("switch_more_experts",
          "Fedus et al. 2021, Switch Transformer, §3 and Fig. 4 (scaling the expert count)",
          "At a fixed compute budget per token, more experts give a lower loss.",
          "1 (dense) → 4 → 16 experts, top_k × expert_hidden = 256 held, 2000 steps",
          "model.n_experts", (1, 4, 16),
          (Check("final_val_loss", 1, 4, "lower"), Check("final_val_loss", 4, 16, "lower")),
          # 4 seeds decided 1 -> 4 (-0.042 [-0.053, -0.030]) but not 4 -> 16 (-0.019, paired
          # sd 0.017): 8 seeds give t(7) * sd / sqrt(8) ~ 0.014 (measured, 2026-12-07).
          seeds=8, budget_min=35),
    Claim("st_moe_z_loss",
          "Zoph et al. 2022, ST-MoE, §3.3 and Table 4 (router z-loss)",
          "The router z-loss keeps training stable where it otherwise spikes, at no cost "
          "in quality.",
          "z_loss_coef 0 → 0.001 at a learning rate 10× the base (3e-2), 1000 steps",
          "model.z_loss_coef", (0.0, 0.001),
          (Check("loss_spike", 0.0, 0.001, "lower"),
           Check("final_val_loss", 0.0, 0.001, "no_worse", margin=0.01)),
          overrides=("--train.lr=3e-2", "--train.max_steps=1000", "--train.ckpt_every=1000",
                     "--train.eval_every=1000"), budget_min=8),
    Claim("aux_free_balancing",
          "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing, Table 2; DeepSeek-V3 §2.1.2",
          "Bias balancing keeps the maximal load violation far below the auxiliary loss's, at "
          "equal or better loss.",
          "balance aux_loss (coef 0.05) → bias (update rate 1e-3), 16 experts top-2, 1500 "
          "steps; load: the most loaded expert over the mean (worst layer), last 10% of steps",
          "model.balance", ("aux_loss", "bias"),
          (Check("max_over_mean_load", "aux_loss", "bias", "lower"),
           Check("final_val_loss", "aux_loss", "bias", "no_worse", margin=0.01)),
          config="configs/ablate_routing.yaml", budget_min=10),
    Claim("fine_grained_experts",
          "Dai et al. 2024, DeepSeekMoE, §3.1 and Table 1; Krajewski et al. 2024",
          "At fixed active and total parameters, finer experts give a lower loss.",
          "granularity 1 (16 × 128, top-2) → 4 (64 × 32, top-8), 1500 steps",
          "granularity", (1, 4),
          (Check("final_val_loss", 1, 4, "lower"),),
          config="configs/ablate_routing.yaml", budget_min=12),
    Claim("olmoe_token_choice",
          "Muennighoff et al. 2024, OLMoE, §4.1.4 (expert choice vs token choice)",
          "Token choice beats expert choice at the same tokens.",
          "routing token_choice (aux loss) → expert_choice (balanced by construction), "
          "capacity factor 1.25, 1500 steps; expert choice is evaluated as trained (capacity "
          "1.25, its routing sees the whole group), token choice dropless",
          "model.routing", ("token_choice", "expert_choice"),
          (Check("final_val_loss", "token_choice", "expert_choice", "higher"),),
          arm_overrides=(("expert_choice", ("--model.balance=none",
                                            "--model.eval_capacity_factor=1.25")),),
          config="configs/ablate_routing.yaml", budget_min=10),
    Claim("olmoe_shared_expert",
          "Muennighoff et al. 2024, OLMoE, §4.1.3 (shared experts)",
          "A shared expert does not help at fixed compute (without fine-grained experts).",
          "0 → 1 shared expert of 128 taking one of the two active slots (16 × 128), 1500 steps",
          "model.n_shared_experts", (0, 1),
          (Check("final_val_loss", 0, 1, "no_better", margin=0.005),),
          config="configs/ablate_routing.yaml", budget_min=10),
    Claim("capacity_batch_dependence",
          "Puigcerver et al. 2023, From Sparse to Soft Mixtures of Experts (sparse MoE is "
          "deterministic per batch, not per sequence); the public explanation of GPT-4's "
          "non-determinism at temperature 0",
          "Batch-dependent outputs come from capacity dropping: with a finite capacity factor "
          "a prompt's next-token distribution depends on its batch-mates; dropless it does "
          "not, to float noise.",
          "capacity factor null (dropless) → 1.25 in training and evaluation, capacity groups "
          "of 16 sequences, 500 steps; metric: KL between a prompt's next-token distributions "
          "with different random batch-mates in the model's own batched forward (4 validation "
          "prompts × 6 draws, every position), on a log10 scale above 1e-12 (float noise)",
          "model.capacity_factor", (None, 1.25),
          (Check("batch_kl_log10", None, 1.25, "higher"),
           Check("batch_kl", None, None, "zero", margin=1e-9)),
          overrides=("--model.eval_capacity_factor=train", "--train.max_steps=500",
                     "--train.ckpt_every=500", "--train.eval_every=500"),
          budget_min=5),
)


def check_verdict(iv: Interval, check: Check) -> str:
    """agrees / disagrees / inconclusive for the interval of arm - base."""
    if iv.n < 2:
        return "inconclusive"
    if check.expect in ("lower", "higher"):
        sign = -1 if check.expect == "lower" else 1
        if (iv.high < 0) if sign < 0 else (iv.low > 0):
            return "agrees"
        if (iv.low > 0) if sign < 0 else (iv.high < 0):
            return "disagrees"
        return "inconclusive"
    if check.expect == "no_worse":  # arm - base <= margin for a lower-is-better metric
        if iv.high < check.margin:
            return "agrees"
        return "disagrees" if iv.low > 0 else "inconclusive"
    if check.expect == "no_better":
        if iv.low > -check.margin:
            return "agrees"
        return "disagrees" if iv.high < 0 else "inconclusive"
    raise ValueError(f"check.expect={check.expect!r}: lower, higher, no_worse or no_better "
                     "(zero is judged on values, not an interval: evaluate_check)")


def claim_verdict(verdicts: list[str]) -> str:
    if verdicts and all(v == "agrees" for v in verdicts):
        return "agrees"
    return "disagrees" if "disagrees" in verdicts else "inconclusive"


def metric_value(row: dict, metric: str) -> float | None:
    if metric in RUN_METRICS:
        return run_metric(metric, row["run_dir"]) if row.get("status") == "ok" else None
    v = row.get(metric)
    return None if v in (None, "") else float(v)


def evaluate_check(rows: list[dict], key: str, check: Check) -> dict:
    """The check's paired differences (arm - base, by seed index) and verdict; for ``zero``
    the arm's own values: agrees when every seed's is within ``margin`` of 0, disagrees when
    one is not (the estimate is their mean, the interval their range)."""
    by = {}
    for r in rows:
        if r.get("status") == "ok" and r.get(key) in (check.base, check.arm):
            v = metric_value(r, check.metric)
            if v is not None:
                by[(r[key], r["seed_index"])] = v
    seeds = sorted({s for (v, s) in by if v == check.base} & {s for (v, s) in by
                                                               if v == check.arm})
    if check.expect == "zero":
        return _zero_check(check, [by[(check.arm, s)] for s in seeds])
    diffs = [by[(check.arm, s)] - by[(check.base, s)] for s in seeds]
    finite = [d for d in diffs if math.isfinite(d)]
    if not finite or len(finite) < len(diffs):  # a diverged arm: its sign is all we know
        iv = Interval(math.nan, math.nan, math.nan, 0, math.nan)
        verdict = "inconclusive"
        if diffs and all(d == -math.inf for d in diffs):  # the base diverged, the arm not
            verdict = "agrees" if check.expect in ("lower", "no_worse") else "disagrees"
        if diffs and all(d == math.inf for d in diffs):  # the arm diverged, the base not
            verdict = "agrees" if check.expect in ("higher", "no_better") else "disagrees"
    else:
        iv = mean_interval(finite)
        verdict = check_verdict(iv, check)
    return {"metric": check.metric, "base": check.base, "arm": check.arm,
            "expect": check.expect, "margin": check.margin, "seeds": len(diffs),
            "base_mean": _mean([by[(check.base, s)] for s in seeds]),
            "arm_mean": _mean([by[(check.arm, s)] for s in seeds]),
            "estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
            "verdict": verdict}


def _zero_check(check: Check, values: list[float]) -> dict:
    """A ``zero`` check on the arm's values per seed (a single run is enough to refute it)."""
    if not values:
        verdict = "inconclusive"
    else:
        verdict = "agrees" if all(abs(v) <= check.margin for v in values) else "disagrees"
    low, high = (min(values), max(values)) if values else (math.nan, math.nan)
    return {"metric": check.metric, "base": check.base, "arm": check.arm,
            "expect": check.expect, "margin": check.margin, "seeds": len(values),
            "base_mean": _mean(values), "arm_mean": _mean(values),
            "estimate": _mean(values), "ci_low": low, "ci_high": high, "verdict": verdict}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def run_claim(claim: Claim, out: Path, quick: bool = False, jobs: int = 1,
              threads: int | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run the claim's sweep into ``out/<name>`` (resuming a finished one for free) and judge
    its checks."""
    from moe.ablate.plots import paired_deltas_plot

    t0 = time.perf_counter()
    overrides = list(claim.overrides) + (QUICK if quick else [])
    seeds = claim.quick_seeds if quick else claim.seeds
    extra = dict(claim.arm_overrides)
    rows: list[dict] = []
    for value in claim.values:  # one sweep per arm: an arm may need its own overrides
        label = f"{claim.key.split('.')[-1]}={format_value(value)}"
        grid = parse_grid([f"{claim.key}={format_value(value)}"])
        rows += run_sweep(claim.config, overrides + list(extra.get(value, ())), grid, seeds,
                          out / claim.name / label, fixed=claim.fixed_compute, echo=echo,
                          jobs=jobs, threads=threads, plots=False)
    paired_deltas_plot(rows, [claim.key], out / claim.name / "paired_deltas.png")
    checks = [evaluate_check(rows, claim.key, c) for c in claim.checks]
    head = checks[0]
    return {"name": claim.name, "source": claim.source, "statement": claim.statement,
            "setting": claim.setting + (" (--quick)" if quick else ""), "seeds": seeds,
            "verdict": claim_verdict([c["verdict"] for c in checks]),
            "estimate": head["estimate"], "ci_low": head["ci_low"], "ci_high": head["ci_high"],
            "wall_s": round(time.perf_counter() - t0, 1), "budget_min": claim.budget_min,
            "checks": checks, "plot": f"{claim.name}/paired_deltas.png",
            "failed": [f"{r['name']}: {r.get('error', '')}" for r in rows
                       if r.get("status") != "ok"]}


def report_markdown(results: list[dict]) -> str:
    lines = ["# The literature's claims, checked", "",
             "Each claim ran as a sweep paired by seed (moe/ablate/claims.py); Δ is arm − "
             "base, mean and Student-t 95% interval over seeds.", "",
             "| claim | verdict | headline Δ [95% CI] | seeds | wall |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | **{r['verdict']}** | {_ci(r)} | {r['seeds']} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    for r in results:
        lines += ["", f"## {r['name']}: {r['verdict']}", "",
                  f"- Source: {r['source']}", f"- Claim: {r['statement']}",
                  f"- Our setting: {r['setting']}; {r['seeds']} seeds; "
                  f"{r['wall_s'] / 60:.1f} min (budget {r['budget_min']:g} min)", "",
                  "| metric | base → arm | base | arm | Δ [95% CI] | expected | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in r["checks"]:
            expect = c["expect"] + (f" (margin {c['margin']:g})" if c["margin"] else "")
            lines.append(f"| {c['metric']} | {format_value(c['base'])} → "
                         f"{format_value(c['arm'])} | {c['base_mean']:.4f} | "
                         f"{c['arm_mean']:.4f} | {_ci(c)} | {expect} | {c['verdict']} |")
        lines += [f"- failed run `{f}`" for f in r.get("failed", [])]
        lines += ["", f"![{r['name']}]({r['plot']})"]
    return "\n".join(lines) + "\n"


def _ci(r: dict) -> str:
    if not math.isfinite(r["estimate"]) or not math.isfinite(r["ci_low"]):
        return "-"
    return f"{r['estimate']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"


def _strict(x):
    """JSON without NaN or infinities (null instead), and grid values as text."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


def run_claims(names: list[str] | None, out: str | Path, quick: bool = False, jobs: int = 1,
               threads: int | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Run the named claims (all by default); write report.md and claims.json after each."""
    known = {c.name: c for c in CLAIMS}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ValueError(f"unknown claim(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(known)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names or list(known):
        echo(f"== claim {name}")
        results.append(run_claim(known[name], out, quick, jobs, threads, echo))
        echo(f"== {name}: {results[-1]['verdict']} ({_ci(results[-1])})")
        (out / "claims.json").write_text(json.dumps(_strict(results), indent=2) + "\n")
        (out / "report.md").write_text(report_markdown(results))
    return results


__all__ = ["CLAIMS", "Check", "Claim", "batch_kl", "check_verdict", "claim_verdict",
           "evaluate_check", "loss_spike", "report_markdown", "run_claim", "run_claims"]

