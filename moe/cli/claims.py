"""Check the MoE literature's claims on this machine: each a sweep paired by seed, judged by
95% intervals (moe/ablate/claims.py).

    python scripts/claims.py --out runs/claims                       # every claim
    python scripts/claims.py switch_more_experts aux_free_balancing --out runs/claims
    python scripts/claims.py --quick --out /tmp/claims               # smoke size, decides nothing
    python scripts/claims.py --list

Writes ``<out>/report.md`` and ``<out>/claims.json`` (per claim: name, verdict, estimate,
ci_low, ci_high, wall_s, checks) and one sweep folder per claim; running it again resumes
(finished points are skipped). Installed as the moe-claims command.
"""

from __future__ import annotations

import argparse
import sys

from moe.ablate.claims import CLAIMS, run_claims
from moe.ablate.sweep import default_jobs
from moe.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("names", nargs="*", help="claims to run (default: all; see --list)")
    p.add_argument("--out", default="runs/claims", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="a few steps and 2 seeds per claim: checks the machinery only")
    p.add_argument("--jobs", type=int, default=None,
                   help="grid points trained at once (default: 2 on 2 cores or more)")
    p.add_argument("--threads-per-job", type=int, default=None,
                   help="torch threads per point (default: the cores over --jobs)")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    args = p.parse_args(argv)
    if args.list:
        for c in CLAIMS:
            print(f"{c.name:24s} {c.statement} [{c.source}] (~{c.budget_min:g} min)")
        return 0
    try:
        results = run_claims(args.names or None, args.out, args.quick,
                             args.jobs or default_jobs(), args.threads_per_job)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r['name']:24s} {r['verdict']:12s} {r['wall_s'] / 60:5.1f} min")
    print(f"report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
