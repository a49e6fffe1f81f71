"""Train a model: python scripts/train.py --config configs/tiny.yaml [--section.key=value ...]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.cli import parse_config  # noqa: E402
from moe.checkpoint import CheckpointError  # noqa: E402
from moe.config import ConfigError  # noqa: E402
from moe.train import NonFiniteError, train  # noqa: E402


def main() -> None:
    cfg, _ = parse_config(description=__doc__)
    try:
        summary = train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:  # train.on_nonfinite stopped the run: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    import torch.distributed as dist

    if dist.is_initialized():  # all ranks finished: close the group (NCCL warns otherwise)
        dist.destroy_process_group()
    if not summary["is_main"]:
        return
    if summary.get("val_loss") is not None:
        print(f"step {summary['step']}: val loss {summary['val_loss']:.4f}")
    bad = summary.get("nonfinite", {})
    if any(bad.values()):  # train.on_nonfinite=skip|rollback absorbed some steps
        print(f"non-finite steps: {bad['skipped']} skipped, {bad['rolled_back']} rolled back")
    if "sample" in summary:
        print("--- sample ---")
        print(summary["sample"])


if __name__ == "__main__":
    main()
