"""Peak host memory per rank of building a config's model (a benchmark: see
moe/bench/init_memory.py).

    python scripts/init_memory.py --config configs/a100x8_tp2pp2dp2.yaml          # 8 ranks
    python scripts/init_memory.py --config configs/a100x8_tp2pp2dp2.yaml --full   # 1 process,
                                                            # the whole model (the baseline)

The ranks run on the CPU (gloo) whatever the config says: train.device=cpu, fp32.
"""

from __future__ import annotations

import argparse
import sys

from moe.bench.init_memory import measure
from moe.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--full", action="store_true",
                    help="one process materialising the whole model (no sharded init)")
    args, overrides = ap.parse_known_args(argv)
    overrides = [*overrides, "--train.device=cpu", "--train.dtype=fp32",
                 "--parallel.backend=gloo"]
    try:
        load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = measure(args.config, overrides, full=args.full)
    gib = 2.0**30
    print(f"{'rank':>4} {'params':>14} {'param GiB':>10} {'peak RSS GiB':>13} "
          f"{'before build':>13} {'seconds':>8}")
    for r, row in enumerate(rows):
        print(f"{r:>4} {row['params']:>14,d} {row['param_bytes'] / gib:>10.2f} "
              f"{row['peak_rss'] / gib:>13.2f} {row['rss_before_build'] / gib:>13.2f} "
              f"{row['seconds']:>8.1f}")
    total = sum(row["peak_rss"] for row in rows)
    print(f"sum of peaks: {total / gib:.2f} GiB over {len(rows)} process(es)", file=sys.stderr)
    return 0

