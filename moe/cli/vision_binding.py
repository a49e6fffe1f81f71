"""How many binding questions a trained vision run needs: its text side and cross-attention
trained on "is there a <colour> <shape>?" alone, over its frozen image latents.

    python scripts/vision_binding.py --run runs/vision_tiny                # ~5 min, 1 thread
    python scripts/vision_binding.py --run runs/vision_tiny --batch 16,64 --steps 1200
    python scripts/vision_binding.py --run runs/vision_tiny --features oracle

Prints, per batch size, the validation binding accuracy (a yes and a distractor no per
validation image; chance 1/2) and the training loss (ln 2 = 0.693: a constant answer) every
--eval-every steps, with the number of binding questions trained on so far
(moe/vision/binding_lm.py says what is trained and how). The run's own weights are the start
of every curve. ``--json`` prints one object. An error prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from moe.checkpoint import CheckpointError, load_model
from moe.data.tokenizer import BPETokenizer
from moe.model.moe import CONFIGURED_CAPACITY
from moe.vision import binding_lm as blm
from moe.vision import data as vdata
from moe.vision.probe import encoder_features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--run", required=True, help="a trained vision run (or step folder)")
    parser.add_argument("--features", choices=("latents", "oracle"), default="latents",
                        help="the run's frozen latents, or perfect per-cell features")
    parser.add_argument("--batch", default="64", help="binding questions per step, comma-separated")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--dropless", action="store_true",
                        help="MoE layers without capacity (default: the run's configured capacity)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg) -> None:
        print(msg, file=sys.stderr)
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
        if not batches or min(batches) < 1 or args.steps < 1 or args.eval_every < 1:
            raise ValueError("--batch, --steps and --eval-every must be positive")
        loaded = load_model(args.run)
        cfg = loaded.cfg
        if not cfg.vision.enabled:
            raise ValueError(f"{args.run} is not a vision run (vision.enabled: false)")
        if loaded.tokenizer is None:
            raise ValueError(f"{args.run} has no tokenizer.json beside it or in its data cache")
        tok = BPETokenizer.load(loaded.tokenizer)
        torch.set_num_threads(args.threads)
        vc = cfg.vision
        data = vdata.load_or_build(cfg.data.cache_dir, vc.n_train, vc.n_val, vc.n_heldout,
                                   vc.data_seed, vc.image_size, vc.max_objects)
        model = loaded.model
        if args.features == "oracle":
            media = [blm.oracle_media(s, vc.n_latents, vc.d_vision)
                     for s in (data.train, data.val)]
        else:
            media = [encoder_features(model, s, "latents") for s in (data.train, data.val)]
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_rows, val_rows = blm.binding_rows(tok, data.train), blm.binding_rows(tok, data.val)
    yes, no = tok.encode(" yes")[0], tok.encode(" no")[0]
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    curves = {}
    for batch in batches:
        model.load_state_dict(start_state)
        log(f"batch {batch}: {len(train_rows)} training questions, {len(val_rows)} validation")
        curves[batch] = blm.train_on_binding(
            model, train_rows, media[0], val_rows, media[1], pad=tok.eot_id, yes=yes, no=no,
            steps=args.steps, batch=batch, lr=args.lr, eval_every=args.eval_every,
            seed=args.seed, capacity_factor=None if args.dropless else CONFIGURED_CAPACITY, log=log)
    if args.json:
        print(json.dumps({"run": str(loaded.checkpoint), "step": loaded.step,
                          "features": args.features, "lr": args.lr, "dropless": args.dropless,
                          "curves": {str(b): c for b, c in curves.items()}}))
        return 0
    print(f"{loaded.checkpoint} (step {loaded.step}), {args.features}; val exists (chance 0.5) "
          f"and training loss (ln 2 = {math.log(2):.3f}) by step")
    print("| batch | " + " | ".join(str(r["step"]) for r in curves[batches[0]]) + " |")
    print("| --- |" + " ---: |" * len(curves[batches[0]]))
    for batch, curve in curves.items():
        print(f"| {batch} | " + " | ".join(
            f"{r['val_exists']:.3f}" + ("" if math.isnan(r["loss"]) else f" ({r['loss']:.2f})")
            for r in curve) + " |")
    return 0
