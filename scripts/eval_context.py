"""Validation loss by position bucket, for judging a context extension.

    python scripts/eval_context.py --run runs/long_base [--lengths 128,256,512]
        [--model.rope_scaling.type=yarn --model.rope_scaling.original_max_seq_len=128 ...]

Options: --help. Code: moe/cli/eval_context.py; docs/long_context.md has the recipe.
"""

from moe.cli.eval_context import main

if __name__ == "__main__":
    raise SystemExit(main())
