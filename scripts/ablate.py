"""Sweep a grid of config values over seeds; write results.csv, summary.md and plots.

    python scripts/ablate.py --config configs/ablate.yaml --seeds 2 --out runs/ablate \\
        --grid model.n_experts=1,4,16 model.capacity_factor=1.0,1.25,2.0,null

Options: --help. Code: moe/cli/ablate.py; installed as the moe-ablate command.
"""

from moe.cli.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
