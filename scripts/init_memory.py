"""Peak host memory per rank of building a config's model (a benchmark: see
moe/bench/init_memory.py).

    python scripts/init_memory.py --config configs/a100x8_tp2pp2dp2.yaml [--full]

Options: --help. Code: moe/cli/init_memory.py; installed as the moe-init-memory command.
"""

from moe.cli.init_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
