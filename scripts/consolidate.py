"""Consolidate a checkpoint of any layout into one plain torch.save file.

    python scripts/consolidate.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out model.pt

Options: --help. Code: moe/cli/consolidate.py; installed as the moe-consolidate command.
"""

from moe.cli.consolidate import main

if __name__ == "__main__":
    raise SystemExit(main())
