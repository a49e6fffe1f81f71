"""Parameter / FLOP / KV-cache accounting for a config, and per GPU for a parallel layout.

    python scripts/count_params.py --config configs/gpt4.yaml [--section.key=value ...] [--json]

Options: --help. Code: moe/cli/count_params.py; installed as the moe-count-params command.
"""

from moe.cli.count_params import main

if __name__ == "__main__":
    raise SystemExit(main())
