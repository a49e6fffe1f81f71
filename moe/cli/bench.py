"""Training-step throughput and MFU: the MoE model against the dense model with the same active
parameters (every FFN dense, hidden = top_k * expert_hidden).

    python scripts/bench.py --config configs/bench.yaml                 # human-readable
    python scripts/bench.py --config configs/bench.yaml --json          # one JSON object
    python scripts/bench.py --config configs/bench.yaml --impls         # + grouped / bmm / loop
    python scripts/bench.py --config configs/bench.yaml --profile       # torch.profiler table
    python scripts/bench.py --config configs/ablate.yaml --profile-cpu  # operators, CPU time
    python scripts/bench.py --config configs/bench.yaml --ac            # activation checkpointing
    python scripts/bench.py --config configs/bench.yaml --model.n_experts=8 --steps 20
    python scripts/bench.py --config configs/bench.yaml --experts 8,16,64,256   # many experts

Runs on CUDA when available and train.device allows (bf16 autocast for train.dtype auto/bf16),
else on CPU (fp32 unless train.dtype=bf16). Tokens/s is the median of ``--steps`` timed steps
after ``--warmup`` untimed ones per variant; the variants' steps are taken in turns so a noisy
machine slows them alike. The FLOP convention is in moe/bench/step.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe.bench.step import profile_step, run_bench
from moe.config import ConfigError, load_config
from moe.device import resolve_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Any --section.key=value overrides the config.")
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--impls", action="store_true",
                   help="also time the MoE with each expert implementation (grouped, bmm, loop)")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of MoE steps instead of benchmarking")
    p.add_argument("--profile-cpu", action="store_true",
                   help="print each aten operator's thread CPU time and calls per MoE step "
                        "instead of benchmarking (moe/bench/ops.py; robust to machine load)")
    p.add_argument("--ac", action="store_true",
                   help="peak memory and fwd+bwd tokens/s under activation_checkpointing none, "
                        "full and selective, each in a fresh process (moe/bench/memory.py)")
    p.add_argument("--experts", default=None, metavar="N,N,...",
                   help="forward+backward tokens/s at these expert counts instead (e.g. "
                        "8,16,64,256), relative to the first (moe/bench/step.py run_expert_counts)")
    p.add_argument("--experts-mode", choices=("fine", "same"), default="fine",
                   help="fine: split the first count's experts (active and total parameters "
                        "fixed); same: only n_experts changes (default fine)")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} "
                "(overrides look like --section.key=value)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1, --warmup >= 0")
    try:
        cfg = load_config(args.config, overrides)
        resolve_device(cfg.train.device)  # train.device=cuda without a GPU: one line, exit 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    if args.profile:
        print(profile_step(cfg, steps=args.steps, warmup=args.warmup))
        return 0
    if args.profile_cpu:
        from moe.bench.ops import format_table
        from moe.bench.step import profile_step_cpu

        r = profile_step_cpu(cfg, steps=args.steps, warmup=args.warmup)
        print(json.dumps(r) if args.json else format_table(r))
        return 0

    log = None if args.json else (lambda s: print(s, flush=True))
    if args.experts:
        from moe.bench.step import run_expert_counts

        try:
            counts = tuple(int(n) for n in args.experts.split(","))
            r = run_expert_counts(cfg, counts, args.experts_mode, steps=args.steps,
                                  warmup=args.warmup, log=log)
        except ValueError as e:
            p.error(f"--experts {args.experts}: {e}")
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"\nforward+backward, {r['tokens_per_step']} tokens/step, {r['threads']} threads, "
              f"median of {r['steps']} turns ({args.experts_mode}); 1-min load average "
              f"{r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}")
        print(f"{'experts':>8s} {'top_k':>6s} {'hidden':>7s} {'tokens/s':>10s} {'ratio':>6s} "
              f"{'drop':>6s} {'step ms':>8s} {'experts ms':>11s} {'experts only':>13s}")
        for v in r["counts"].values():
            print(f"{v['n_experts']:8d} {v['top_k']:6d} {v['expert_hidden']:7d} "
                  f"{v['fwd_bwd_tokens_per_s']:10.0f} {v['ratio']:6.3f} {v['drop_frac']:6.3f} "
                  f"{v['fwd_bwd_s_median'] * 1e3:8.1f} {v['experts_fwd_bwd_s_median'] * 1e3:11.1f} "
                  f"{v['experts_only_ratio']:13.3f}")
        print("experts ms: the experts' own forward + backward (GroupedExperts on each layer's "
              "real loads, no routing, dispatch or combine); experts only: the ratio if only "
              "that changed from the first count")
        return 0
    if args.ac:
        from moe.bench.memory import run_memory_bench

        r = run_memory_bench(cfg, steps=args.steps, warmup=args.warmup, log=log)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['tokens_per_step']} tokens/step, median of {r['steps']} fwd+bwd after "
                  f"{r['warmup']} warm-up; peak = {r['measure']}")
            for mode, v in r["modes"].items():
                print(f"{mode:10s} peak x{v['peak_vs_none']:.2f}   speed x{v['speed_vs_none']:.2f}")
        return 0
    r = run_bench(cfg, steps=args.steps, warmup=args.warmup, impls=args.impls, log=log)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"\n{r['tokens_per_step']} tokens/step, median of {r['steps']} timed steps per variant "
          f"(taken in turns) after {r['warmup']} warm-up steps; 1-min load average "
          f"{r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}")
    print(f"peak (measured matmul): {r['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"{'':8s} {'tokens/s':>10s} {'step ms':>8s} {'fwd+bwd':>8s} {'clip':>6s} {'optim':>6s} "
          f"{'MFU':>6s} {'active params':>14s}")

    def row(name: str, tps: float, step_s: float, ph: dict[str, float], mfu: float,
            extra: str) -> None:
        print(f"{name:8s} {tps:10.0f} {step_s * 1e3:8.1f} {ph['fwd_bwd'] * 1e3:8.1f} "
              f"{ph['clip'] * 1e3:6.1f} {ph['optimizer'] * 1e3:6.1f} {mfu:6.1%} {extra}")

    row("moe", r["moe_tokens_per_s"], r["moe_step_s"], r["moe_phases_s"], r["mfu"],
        f"{r['moe_active_params']:14,d}   (expert_impl {r['expert_impl']} -> "
        f"{r['expert_impl_resolved']})")
    row("dense", r["dense_tokens_per_s"], r["dense_step_s"], r["dense_phases_s"], r["dense_mfu"],
        f"{r['dense_active_params']:14,d}")
    for impl, v in r.get("impls", {}).items():
        row("  " + impl, v["tokens_per_s"], v["step_s"], v["phases_s"], v["mfu"],
            f"{'':14s}   moe/dense {v['ratio_to_dense']:.2f}")
    print(f"moe / dense tokens/s: {r['ratio']:.3f} (median of per-turn ratios "
          f"{r['ratio_paired']:.3f}; fwd+bwd only {r['ratio_fwd_bwd']:.3f})")
    print(f"moe drop fraction {r['moe_drop_frac']:.3f} (capacity factor "
          f"{cfg.model.capacity_factor}): MFU counts nominal FLOPs; dropped assignments skip "
          f"their expert, so the MoE ran {1 - r['moe_drop_frac']:.1%} of its nominal expert FLOPs")
    return 0

