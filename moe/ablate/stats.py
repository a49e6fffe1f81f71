"""Deciding a comparison: paired differences by seed, a 95% interval, a verdict.

Two arms of an ablation trained with the same seed share their data order, validation windows
and the initial values of every parameter they have in common (the by-name init of
moe/model/init.py), so the difference of their losses within a seed cancels most of what the
seed does; its spread across seeds is the noise left. For n seeds with differences d_i:

    estimate = mean(d),  half-width = t_{0.975, n-1} * sd(d) / sqrt(n)

(Student's t; with few seeds the t quantile is large, 12.71 at n = 2 and 4.30 at n = 3, which
is the honest price of few seeds: a bootstrap over 2 or 3 values would pretend to know more).
The verdict on a loss (lower is better) is *better* when the interval lies below 0, *worse*
when above, *inconclusive* when it holds 0. One seed gives no interval: inconclusive.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

# Student's t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (>= 1): the table up
    to 30, then the Cornish-Fisher expansion (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"df={df}: a t interval needs at least 2 values")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval (low = high = estimate, sd = nan, with one value)."""

    estimate: float
    low: float
    high: float
    n: int
    sd: float

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.high < 0 or self.low > 0)

    def text(self, fmt: str = "{:+.4f}") -> str:
        if self.n < 2:
            return f"{fmt.format(self.estimate)} (1 seed: no interval)"
        return f"{fmt.format(self.estimate)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"

    def to_dict(self) -> dict:
        return asdict(self)


def mean_interval(values: list[float]) -> Interval:
    """The mean of ``values`` (e.g. paired differences) with its t interval."""
    if not values:
        raise ValueError("no values: nothing to estimate")
    m, n = statistics.fmean(values), len(values)
    if n == 1:
        return Interval(m, m, m, 1, math.nan)
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, sd)


def verdict(interval: Interval, lower_is_better: bool = True) -> str:
    """"better" / "worse" (the interval of arm - baseline excludes 0) or "inconclusive"."""
    if not interval.excludes_zero():
        return "inconclusive"
    below = interval.high < 0
    return "better" if below == lower_is_better else "worse"


@dataclass(frozen=True)
class Comparison:
    """``arm`` against ``base`` (values of ``key``), the other grid values ``fixed``."""

    key: str
    base: object
    arm: object
    fixed: tuple
    interval: Interval
    verdict: str


def paired_comparisons(rows: list[dict], grid_keys: list[str], metric: str = "final_val_loss",
                       lower_is_better: bool = True) -> list[Comparison]:
    """Each value of the first grid key against the one before it (n_experts 1 -> 4, 4 -> 16),
    for every combination of the other grid values, the metric's differences paired by seed
    index. A pair needs both runs finished with the metric; combinations with no pair are
    left out."""
    if not grid_keys:
        return []
    key, rest = grid_keys[0], grid_keys[1:]
    ok = [r for r in rows if r.get("status") == "ok" and r.get(metric) not in (None, "")
          and r.get("seed_index") not in (None, "")]
    values = list(dict.fromkeys(r.get(key) for r in rows))
    by = {(r.get(key), tuple(r.get(k) for k in rest), r["seed_index"]): float(r[metric])
          for r in ok}
    fixed_values = list(dict.fromkeys(tuple(r.get(k) for k in rest) for r in rows))
    out = []
    for base, arm in zip(values, values[1:]):
        for fixed in fixed_values:
            seeds = sorted({s for (v, f, s) in by if f == fixed and v == arm}
                           & {s for (v, f, s) in by if f == fixed and v == base})
            if not seeds:
                continue
            iv = mean_interval([by[(arm, fixed, s)] - by[(base, fixed, s)] for s in seeds])
            out.append(Comparison(key, base, arm, fixed, iv, verdict(iv, lower_is_better)))
    return out
