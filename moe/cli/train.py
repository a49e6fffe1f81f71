"""Train a model: python scripts/train.py --config configs/tiny.yaml [--section.key=value ...]"""

from __future__ import annotations

import sys

import torch.distributed as dist

from moe.checkpoint import CheckpointError
from moe.cli import parse_config
from moe.config import ConfigError
from moe.train.loop import train
from moe.train.nonfinite import NonFiniteError


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 stopped by train.on_nonfinite=stop, 2 a config or checkpoint
    error (one ``error:`` line on stderr, no traceback)."""
    cfg, _ = parse_config(argv, description=__doc__)
    try:
        summary = train(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:  # train.on_nonfinite stopped the run: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if dist.is_initialized():  # all ranks finished: close the group (NCCL warns otherwise)
        dist.destroy_process_group()
    if not summary["is_main"]:
        return 0
    if summary.get("val_loss") is not None:
        print(f"step {summary['step']}: val loss {summary['val_loss']:.4f}")
    bad = summary.get("nonfinite", {})
    if any(bad.values()):  # train.on_nonfinite=skip|rollback absorbed some steps
        print(f"non-finite steps: {bad['skipped']} skipped, {bad['rolled_back']} rolled back")
    if "sample" in summary:
        print("--- sample ---")
        print(summary["sample"])
    return 0


if __name__ == "__main__":  # python -m moe.cli.train: what ablation sweeps launch
    raise SystemExit(main())
