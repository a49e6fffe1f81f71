"""Export a training checkpoint to a Hugging Face Mixtral folder, tokenizer included.

    python scripts/export_hf.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out hf/tiny
        [--tokenizer data/cache/builtin-<fingerprint>/tokenizer.json]

Options: --help. Code: moe/cli/export_hf.py; installed as the moe-export-hf command.
"""

from moe.cli.export_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
