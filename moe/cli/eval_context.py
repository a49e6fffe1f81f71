"""Validation loss by position bucket, for judging a context extension.

    python scripts/eval_context.py --run runs/long_base [--lengths 128,256,512]
        [--checkpoint STEP_FOLDER] [--windows 64] [--batch-size 8] [--dropless] [--json]
        [--model.rope_scaling.type=yarn --model.rope_scaling.factor=4
         --model.rope_scaling.original_max_seq_len=128 ...]

Windows of max(--lengths) tokens (+1 for the targets) spread over the validation stream; the
loss is averaged per position, then over the buckets [0, l1), [l1, l2), ... Rotary tables are
not weights, so the model runs at any length: ``model.max_seq_len`` is raised to the longest
length when the checkpoint's is shorter (plain RoPE extrapolates, or the checkpoint's own
rope_scaling applies), and ``--model.rope_scaling...`` / ``--model.max_seq_len=`` overrides
evaluate the same weights with another scaling (``--model.rope_scaling=null``: none);
``--data.key=value`` reads other text with the run's tokenizer (e.g. an imported run's:
``--data.source=files --data.files=notes.txt``). Any other override is refused, as
``train.init_from`` refuses it (moe/train/init_from.py). MoE layers
use the checkpoint's eval capacity factor; ``--dropless`` (none) keeps a position's loss from
depending on which later tokens took the experts' slots (choice_major drops the later ones).
``--json`` adds each window's bucket losses (``window_losses``): the windows are the same for
every model, so two runs compare window by window. Code: moe/analysis/context.py;
docs/long_context.md has the measured recipe. Exit status 2 on a bad run or override.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

from moe.analysis.context import bucket_losses, token_losses
from moe.analysis.windows import DATA_PREFIX, val_windows, with_data
from moe.checkpoint import CheckpointError, load_model
from moe.config import ConfigError, apply_overrides
from moe.data import prepare_data
from moe.device import set_threads
from moe.model import build_model
from moe.train.init_from import init_config_problems


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="--model.max_seq_len=N and --model.rope_scaling[.key]=V "
                                       "override the checkpoint's config.")
    p.add_argument("--run", help="run folder (its newest good checkpoint)")
    p.add_argument("--checkpoint", help="a step folder or consolidated file instead")
    p.add_argument("--lengths", default="128,256,512",
                   help="bucket ends, ascending; the last is the window length "
                        "(default 128,256,512)")
    p.add_argument("--windows", type=int, default=64, help="validation windows (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--dropless", action="store_true",
                   help="no expert capacity limit (default: the checkpoint's eval factor)")
    p.add_argument("--cache-dir", help="token cache folder (default: the run's data.cache_dir)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_known_args(argv)


def _model_for(loaded, overrides: list[str], length: int):
    """The checkpoint's weights in a model built with the overridden max_seq_len and
    rope_scaling (ConfigError for any other key); ``max_seq_len`` raised to ``length``."""
    cfg = copy.deepcopy(loaded.cfg)
    apply_overrides(cfg, overrides)
    if not any(o.startswith("--model.max_seq_len=") for o in overrides):
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, length)
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    cfg.validate()
    problems = init_config_problems(loaded.cfg.to_dict(), cfg)
    if problems:
        raise ConfigError(f"eval_context overrides only model.max_seq_len and "
                          f"model.rope_scaling, not {', '.join(problems)}")
    if length > cfg.model.max_seq_len:
        raise ConfigError(f"--lengths ends at {length} > model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    model = build_model(cfg.model, next(loaded.model.parameters()).device)
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if not args.run and not args.checkpoint:
        print("error: give --run or --checkpoint", file=sys.stderr)
        return 2
    try:
        edges = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        edges = []
    if not edges or edges != sorted(set(edges)) or edges[0] <= 0:
        print(f"error: --lengths={args.lengths!r} must be ascending positive integers",
              file=sys.stderr)
        return 2
    set_threads(args.threads)
    try:
        loaded = load_model(args.checkpoint or args.run, cache_dir=args.cache_dir)
        data = [o for o in overrides if o.startswith(DATA_PREFIX)]
        model, cfg = _model_for(loaded, [o for o in overrides if o not in data], edges[-1])
        cfg = with_data(cfg, loaded.tokenizer, data)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = prepare_data(cfg)
    windows = val_windows(data, edges[-1] + 1, args.windows)
    if len(windows) < args.windows:
        print(f"note: the validation stream holds {len(windows)} windows of {edges[-1] + 1} "
              f"tokens, fewer than --windows={args.windows}", file=sys.stderr)
    kw = {"capacity_factor": None} if args.dropless else {}
    losses = token_losses(model, windows, args.batch_size, **kw)  # [n, L]
    per_pos = losses.double().mean(0)
    rows = bucket_losses(per_pos, edges)
    starts = [0, *edges[:-1]]
    rs = cfg.model.rope_scaling
    out = {"checkpoint": str(loaded.checkpoint), "step": loaded.step,
           "trained_max_seq_len": loaded.cfg.model.max_seq_len,
           "max_seq_len": cfg.model.max_seq_len,
           "rope_scaling": None if rs is None else vars(rs).copy(),
           "windows": len(windows), "length": edges[-1],
           "capacity_factor": None if args.dropless else cfg.model.eval_capacity_factor_resolved,
           "buckets": [{"start": a, "end": b, "loss": loss} for a, b, loss in rows],
           "loss": float(per_pos.mean()),
           # Each window's mean loss per bucket [n][buckets]: pair two runs' windows for the
           # standard error of their difference (the same windows for every model).
           "window_losses": [[round(float(row[a:b].mean()), 6) for a, b in zip(starts, edges)]
                             for row in losses]}
    if args.json:
        print(json.dumps(out))
        return 0
    scaling = "none" if rs is None else (
        f"{rs.type} x{rs.factor:g}" + (f" from {rs.original_max_seq_len}"
                                       if rs.original_max_seq_len else ""))
    print(f"{loaded.checkpoint} (step {loaded.step}, trained at max_seq_len "
          f"{loaded.cfg.model.max_seq_len}); now max_seq_len {cfg.model.max_seq_len}, "
          f"rope_scaling {scaling}; {len(windows)} val windows of {edges[-1]} tokens; "
          f"capacity factor {out['capacity_factor']}")
    print(f"{'positions':>12}  {'loss':>7}")
    for a, b, loss in rows:
        print(f"{f'{a}-{b - 1}':>12}  {loss:7.4f}")
    print(f"{'all':>12}  {out['loss']:7.4f}")
    return 0
