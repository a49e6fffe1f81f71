"""Decode tokens/s against Hugging Face generate(), KV-cache bytes per token, MoE decode statistics.

    python scripts/bench_decode.py [--json] [--repeats 3] [--no-hf] [--section.key=value ...]

Options: --help. Code: moe/cli/bench_decode.py, moe/bench/decode.py; installed as the
moe-bench-decode command.
"""

from moe.cli.bench_decode import main

if __name__ == "__main__":
    raise SystemExit(main())
