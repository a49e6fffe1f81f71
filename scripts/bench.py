"""Training-step throughput and MFU of the MoE model against its active-matched dense model.

    python scripts/bench.py --config configs/bench.yaml [--json] [--impls] [--profile] [--ac]

Options: --help. Code: moe/cli/bench.py; installed as the moe-bench command.
"""

from moe.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
