"""Export a training checkpoint to a GGUF file for llama.cpp, tokenizer included.

    python scripts/export_gguf.py --run runs/tiny --out tiny.gguf [--dtype f32|f16|q8_0]

Options: --help. Code: moe/cli/export_gguf.py; installed as the moe-export-gguf command.
"""

from moe.cli.export_gguf import main

if __name__ == "__main__":
    raise SystemExit(main())
