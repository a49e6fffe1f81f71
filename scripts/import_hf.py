"""Import a Hugging Face MoE folder (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE) as a run folder.

    python scripts/import_hf.py DIR --out runs/mixtral [--max-seq-len 4096]

Options: --help. Code: moe/cli/import_hf.py; installed as the moe-import-hf command.
"""

from moe.cli.import_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
