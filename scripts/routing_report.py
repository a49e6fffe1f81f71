"""Routing diagnostics for a trained checkpoint: load, drops, entropy, code/prose specialisation.

    python scripts/routing_report.py --run runs/tiny --out runs/tiny/routing

Options: --help. Code: moe/cli/routing_report.py; installed as the moe-routing-report command.
"""

from moe.cli.routing_report import main

if __name__ == "__main__":
    raise SystemExit(main())
