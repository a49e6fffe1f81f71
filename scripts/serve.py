"""Serve a trained model over an OpenAI-compatible HTTP API (continuous batching).

    python scripts/serve.py --run runs/tiny [--port 8000] [--host 127.0.0.1] [--slots 8]

Endpoints: /v1/completions (streaming too), /v1/models. Options: --help. Code:
moe/cli/serve.py, moe/inference/server.py; installed as the moe-serve command.
"""

from moe.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
