"""Check the MoE literature's claims on this machine (sweeps paired by seed, 95% intervals).

    python scripts/claims.py --out runs/claims        # every claim; --quick for a smoke run

Options: --help. Code: moe/cli/claims.py, moe/ablate/claims.py; installed as moe-claims.
"""

from moe.cli.claims import main

if __name__ == "__main__":
    raise SystemExit(main())
