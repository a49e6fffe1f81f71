"""Generate text from a trained model (KV cache, sampling controls, streaming output).

    python scripts/generate.py --run runs/tiny --prompt "def " [--max-new-tokens 200]
        [--temperature 0.8] [--top-k 50] [--top-p 1.0] [--seed 0] [--prompt-file FILE]

Options: --help. Code: moe/cli/generate.py; installed as the moe-generate command.
"""

from moe.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
