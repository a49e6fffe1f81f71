"""Consolidate a checkpoint of any layout into one plain torch.save file.

    python scripts/consolidate.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out model.pt

The output is ``{"model": full state dict, "config": resolved config dict, "step", "tokens",
"layout"}``: ``build_model(from_dict(d["config"]).model).load_state_dict(d["model"])`` loads it
in one process, whatever tp x pp x dp x ep layout wrote the checkpoint. Runs in one process
without a process group; needs memory for the whole model (no optimizer state is kept).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.checkpoint import CheckpointError, resolve_checkpoint  # noqa: E402
from moe.parallel.checkpoint import consolidate  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
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
    return out


if __name__ == "__main__":
    main()
