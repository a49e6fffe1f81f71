"""Sweep a grid of config values over seeds; write results.csv, summary.md and plots.

    python scripts/ablate.py --config configs/ablate.yaml --seeds 2 --out runs/ablate \\
        --grid model.n_experts=1,4,16 model.capacity_factor=1.0,1.25,2.0,null

Any other ``--section.key=value`` applies to every point. Re-running the same command skips
finished points and resumes interrupted ones. See moe/ablate/points.py for the fixed-compute rule.

    python scripts/ablate.py --run runs/tiny --out runs/tiny_eval \
        --grid model.eval_capacity_factor=0.5,1.0,2.0,null \\
               model.drop_policy=choice_major,token_major

With ``--run``, no training: the run's checkpoint is evaluated at every point of a grid of
evaluation-time settings (moe/ablate/evaluate.py: capacity factor, drop policy, top-k, group
size, router weights) on its own validation windows.
"""

from __future__ import annotations

import argparse
import sys

from moe.ablate import parse_grid, run_sweep
from moe.ablate.sweep import default_jobs
from moe.checkpoint import CheckpointError
from moe.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be set as --section.key=value.")
    parser.add_argument("--config", default=None, help="base YAML config (see configs/)")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="grid axes, e.g. model.n_experts=1,4,16 model.capacity_factor="
                             "1.0,null (null = None)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per grid point; seed i uses train.seed + i (default 1)")
    parser.add_argument("--out", required=True, help="sweep folder (runs/<name> inside)")
    parser.add_argument("--no-fixed-compute", action="store_true",
                        help="do not adjust top_k / expert_hidden / max_steps to hold active "
                             "parameters and the token budget fixed")
    parser.add_argument("--nproc", type=int, default=1,
                        help="run each point under torchrun --nproc_per_node=N")
    parser.add_argument("--jobs", type=int, default=None,
                        help="grid points trained at once, each its own process (default: 2 "
                             "on 2 cores or more, 1 with --nproc > 1; measured faster)")
    parser.add_argument("--threads-per-job", type=int, default=None,
                        help="torch threads of each point (default: the cores over --jobs); "
                             "a point's numbers depend on this, never on --jobs")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--run", default=None,
                        help="evaluate this run's checkpoint over an evaluation-time grid "
                             "instead of training (no --config, --seeds or overrides)")
    parser.add_argument("--windows", type=int, default=None,
                        help="with --run: validation windows (default: the run's "
                             "data.val_windows)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like "
                     "--section.key=value)")
    if args.run is not None:
        if args.config or overrides or args.seeds != 1:
            parser.error("--run evaluates a trained checkpoint: drop --config, --seeds and "
                         "config overrides (the grid holds the evaluation-time settings)")
        try:
            from moe.ablate.evaluate import eval_sweep

            rows = eval_sweep(args.run, parse_grid(args.grid), args.out, args.windows)
        except (ConfigError, OSError, ValueError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{len(rows)} points evaluated; table in {args.out}/summary.md")
        return 0
    try:
        grid = parse_grid(args.grid)
        rows = run_sweep(args.config, overrides, grid, args.seeds, args.out,
                         fixed=not args.no_fixed_compute, nproc=args.nproc,
                         jobs=args.jobs or (default_jobs() if args.nproc <= 1 else 1),
                         threads=args.threads_per_job,
                         plots=not args.no_plots)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)}/{len(rows)} runs ok; results in {args.out}/results.csv, "
          f"table in {args.out}/summary.md")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0

