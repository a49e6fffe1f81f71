"""Upcycle a dense model into an MoE: each expert a copy of its feed-forward, a fresh router.

    python scripts/upcycle.py SRC --out runs/upcycled --model.n_experts=8 --model.top_k=2

Options: --help. Code: moe/cli/upcycle.py; installed as the moe-upcycle command.
"""

from moe.cli.upcycle import main

if __name__ == "__main__":
    raise SystemExit(main())
