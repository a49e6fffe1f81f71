"""What a sweep trains: the grid, point names, the fixed-compute rule and run identity."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.config import Config, ConfigError, load_config, set_key

# Keys the sweep sets itself; a grid over them would fight the sweep's bookkeeping.
RESERVED_KEYS = {"train.run_dir": "run folders are <out>/runs/<name>",
                 "train.seed": "use --seeds N (seed i is train.seed + i)"}
# Grid keys that are not config keys: the sweep turns them into config values (fixed_compute).
# granularity m: each routed expert split into m experts of expert_hidden / m, top_k * m of
# them active (DeepSeekMoE's fine-grained experts; active and total parameters unchanged).
GRANULARITY = "granularity"
SWEEP_KEYS = {GRANULARITY: "an integer >= 1 (1 = the base experts)"}


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
            if key in SWEEP_KEYS:
                value = yaml.safe_load(raw.strip())
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"grid key '{key}' takes {SWEEP_KEYS[key]}, got {raw!r}")
            else:
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
    """``n_experts=4__capacity_factor=1.25__seed=0``: also the point's run folder name."""
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

    0. ``granularity`` m (a grid key of the sweep, not of the config): every routed expert is
       split in m: ``n_experts * m`` experts of ``expert_hidden / m`` (a ConfigError when not
       an integer). Shared experts are not split: they keep the width they have at m = 1
       (``model.shared_expert_hidden`` is set to it; DeepSeekMoE's m fine-grained shared
       segments of each, run as one FFN, are the same function). So total routed, total
       shared and (by rule 1, ``top_k * m``) active parameters are all unchanged.
    1. Active FFN width: each token passes through ``top_k`` experts of ``expert_hidden`` units
       and the shared experts (``n_shared_experts * shared hidden``, always on), so its FFN
       compute and active FFN parameters are proportional to
       ``W = top_k * expert_hidden + shared``; W is held at the base value W0.
       - with granularity or a shared-expert width other than the base's (DeepSeekMoE: the
         shared experts take the place of routed ones, mK - K_s of the mN experts routed):
         ``top_k = (W0 - shared) / expert_hidden``, a ConfigError when not a positive integer
         (shared experts follow ``expert_hidden`` unless ``model.shared_expert_hidden`` is set).
       - ``n_experts < top_k0`` (e.g. ``n_experts=1``, the dense baseline): ``top_k = n_experts``.
       - whenever top_k differs from top_k0 otherwise (set above, or a grid key itself):
         ``expert_hidden = (W0 - shared) / top_k``, a ConfigError when not an integer.
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
    hidden = values.get("model.expert_hidden", m0.expert_hidden)
    # Shared experts keep their width when the routed ones are split (below).
    shared_each = values.get("model.shared_expert_hidden", m0.shared_expert_hidden) or hidden
    n_shared = values.get("model.n_shared_experts", m0.n_shared_experts)
    g = values.get(GRANULARITY, 1)
    if g != 1:
        if hidden % g:
            raise ConfigError(f"granularity={g}: expert_hidden={hidden} does not split into "
                              f"{g} equal experts; pick a divisor of it")
        n_experts, hidden = n_experts * g, hidden // g
        adjusted.update({"model.n_experts": n_experts, "model.expert_hidden": hidden})
        if n_shared and "model.shared_expert_hidden" not in values:
            adjusted["model.shared_expert_hidden"] = shared_each
    shared = n_shared * shared_each
    width = m0.top_k * m0.expert_hidden + m0.shared_hidden_total  # W0
    split = g != 1 or shared != m0.shared_hidden_total
    if "model.top_k" in values:
        top_k = values["model.top_k"]
    elif split:
        top_k = (width - shared) // hidden
        if (width - shared) % hidden or not 1 <= top_k <= n_experts:
            raise ConfigError(f"fixed compute: the active FFN width {width} less the shared "
                              f"experts' {shared} is not 1 to n_experts={n_experts} routed "
                              f"experts of {hidden}; change the grid, or use --no-fixed-compute")
        if top_k != m0.top_k:
            adjusted["model.top_k"] = top_k
    elif n_experts < m0.top_k:
        top_k = adjusted["model.top_k"] = n_experts
    else:
        top_k = m0.top_k
    if top_k != m0.top_k and "model.expert_hidden" not in values and not split:
        routed = width - shared
        if top_k <= 0 or routed % top_k:
            raise ConfigError(f"fixed compute: active FFN width top_k * expert_hidden = {routed} "
                              f"is not divisible by top_k={top_k}; pick another top_k or "
                              f"expert_hidden, or use --no-fixed-compute")
        adjusted["model.expert_hidden"] = routed // top_k
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
                                                       cf, m.min_capacity) if m.n_experts else 0}
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
    overrides: list[str] = field(default_factory=list)  # given to python -m moe.cli.train
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
            config_values = {k: v for k, v in values.items() if k not in SWEEP_KEYS}
            if not fixed and values.get(GRANULARITY, 1) != 1:
                p.error = "error: granularity is a fixed-compute split: drop --no-fixed-compute"
            p.overrides = head + list(overrides) + group + [
                f"--{k}={cli_value(v)}" for k, v in {**config_values, **p.adjusted}.items()] + [
                f"--train.seed={p.seed}", f"--train.run_dir={p.run_dir}"]
            if p.error is None:
                try:
                    p.cfg = load_config(config, p.overrides)
                except ConfigError as e:
                    p.error = f"error: {e}"
            points.append(p)
    return points
