"""How a prompt's next-token distribution changes with its batch-mates (capacity drops).

    python scripts/batch_dependence.py --run runs/tiny --prompt "def " --out runs/tiny/batch \\
        [--capacity-factors 0.5,1.0,1.25,2.0,null] [--group-sizes 1,2,4,8] [--trials 16]

Options: --help. Code: moe/cli/batch_dependence.py; installed as the moe-batch-dependence command.
"""

from moe.cli.batch_dependence import main

if __name__ == "__main__":
    raise SystemExit(main())
