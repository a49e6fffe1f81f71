"""Routing diagnostics for a trained checkpoint: load, drops, entropy, code/prose specialisation.

    python scripts/routing_report.py --run runs/tiny --out runs/tiny/routing [--data.key=value ...]

Writes report.md, report.json and PNGs (load.png, specialisation.png, specialisation_diff.png,
layers.png). Windows come from each source's held-out (val) documents; see moe/analysis/.
``--data.key=value`` reads other text with the run's tokenizer (e.g. an imported run's:
``--data.source=files --data.files=notes.txt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe.analysis import routing_report, source_windows, with_data, write_routing_report
from moe.checkpoint import load_model
from moe.data import prepare_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (its latest checkpoint is used)")
    p.add_argument("--checkpoint", help="a step folder or consolidated .pt file (default: latest)")
    p.add_argument("--out", help="output folder (default: <run>/routing)")
    p.add_argument("--windows", type=int, default=64, help="windows per source (default 64)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="windows per forward (default: train.micro_batch_size)")
    p.add_argument("--cache-dir", help="token cache folder (default: the run's data.cache_dir)")
    args, overrides = p.parse_known_args(argv)
    if not args.run and not args.checkpoint:
        p.error("give --run or --checkpoint")
    try:
        run = load_model(args.checkpoint or args.run, cache_dir=args.cache_dir)
        cfg = with_data(run.cfg, run.tokenizer, overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = prepare_data(cfg)
    windows = source_windows(cfg, data, cfg.data.seq_len, args.windows)
    rep = routing_report(run.model, windows, args.batch_size or cfg.train.micro_batch_size)
    rep.update(checkpoint=str(run.checkpoint), step=run.step)
    out = Path(args.out or Path(args.run or run.checkpoint.parent.parent) / "routing")
    for path in write_routing_report(rep, out, title=f"{run.checkpoint} (step {run.step})"):
        print(f"wrote {path}")
    print((out / "report.md").read_text())
    return 0

