"""Load-test the OpenAI-compatible server over loopback; throughput, latency and invariants.

    python scripts/bench_serve.py [--run RUN] [--requests 200] [--clients 16] [--threads 1]
        [--json]

Options: --help. Code: moe/cli/bench_serve.py, moe/bench/serve.py; installed as the
moe-bench-serve command.
"""

from moe.cli.bench_serve import main

if __name__ == "__main__":
    raise SystemExit(main())
