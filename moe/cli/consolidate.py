"""Consolidate a checkpoint of any layout into one plain torch.save file.

    python scripts/consolidate.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out model.pt

The output is ``{"model": full state dict, "config": resolved config dict, "step", "tokens",
"layout"}``: ``moe.checkpoint.load_model(file)`` (or ``build_model(from_dict(d["config"]).model)
.load_state_dict(d["model"])``) loads it in one process, whatever tp x pp x dp x ep layout
wrote the checkpoint. Runs in one process without a process group; needs memory for the whole
model (no optimizer state is kept).
"""

from __future__ import annotations

import argparse
import sys

from moe.checkpoint import CheckpointError, consolidate, resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its latest checkpoint) or a step folder")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
        out = consolidate(path, args.out)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} from {path}")
    return 0

