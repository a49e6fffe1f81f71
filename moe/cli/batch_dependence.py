"""How a prompt's next-token distribution changes with its batch-mates (capacity drops).

    python scripts/batch_dependence.py --run runs/tiny --prompt "def " --out runs/tiny/batch \
        [--capacity-factors 0.5,1.0,1.25,2.0,null] [--group-sizes 1,2,4,8] [--trials 16]

For each eval capacity factor and capacity-group size the prompt shares its group with random
val windows; KL and top-1 disagreement between draws are exactly 0 when dropless or when the
group is one sequence. See moe/analysis/batch.py. Writes batch_dependence.{json,md,png}.
``--data.key=value`` draws the batch-mates from other text, tokenised with the run's tokenizer
(e.g. an imported run's: ``--data.source=files --data.files=notes.txt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moe.analysis import batch_dependence, val_windows, with_data
from moe.analysis.batch import plot_results, results_markdown
from moe.checkpoint import load_model
from moe.data import prepare_data


def _factors(text: str) -> list[float | None]:
    out = []
    for v in text.split(","):
        v = v.strip()
        out.append(None if v in ("null", "none", "None", "dropless") else float(v))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run folder (its latest checkpoint is used)")
    p.add_argument("--checkpoint", help="a step folder or consolidated .pt file (default: latest)")
    p.add_argument("--prompt", default=None, help="prompt text (default: train.sample_prompt)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead")
    p.add_argument("--capacity-factors", type=_factors, default=_factors("0.5,1.0,1.25,2.0,null"),
                   help="eval capacity factors; null = dropless (default 0.5,1.0,1.25,2.0,null)")
    p.add_argument("--group-sizes", default="1,2,4,8",
                   help="capacity-group sizes in sequences (default 1,2,4,8)")
    p.add_argument("--trials", type=int, default=16, help="batch-mate draws per point")
    p.add_argument("--position", choices=["random", "first", "last"], default="random",
                   help="the prompt's place in its group (default random per trial)")
    p.add_argument("--min-capacity", type=int, default=None,
                   help="override model.min_capacity (short prompts rarely fill the minimum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: <run>/batch_dependence)")
    p.add_argument("--cache-dir", help="token cache folder (default: the run's data.cache_dir)")
    args, overrides = p.parse_known_args(argv)
    if not args.run and not args.checkpoint:
        p.error("give --run or --checkpoint")
    try:
        groups = [int(g) for g in args.group_sizes.split(",")]
        run = load_model(args.checkpoint or args.run, cache_dir=args.cache_dir)
        cfg = with_data(run.cfg, run.tokenizer, overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = prepare_data(cfg)
    text = Path(args.prompt_file).read_text() if args.prompt_file else (
        args.prompt if args.prompt is not None else cfg.train.sample_prompt)
    ids = data.tokenizer.encode(text)[-cfg.model.max_seq_len:] or [data.tokenizer.eot_id]
    prompt = torch.tensor(ids, dtype=torch.long)
    pool = val_windows(data, len(ids), 512)
    results = batch_dependence(run.model, prompt, pool, args.capacity_factors, groups,
                               args.trials, args.seed, args.position, args.min_capacity)
    out = Path(args.out or Path(args.run or run.checkpoint.parent.parent) / "batch_dependence")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(run.checkpoint), "step": run.step, "prompt": text,
            "prompt_tokens": len(ids), "position": args.position, "seed": args.seed,
            "min_capacity": args.min_capacity, "drop_policy": cfg.model.drop_policy}
    (out / "batch_dependence.json").write_text(
        json.dumps({**meta, "results": results}, indent=2) + "\n")
    title = f"{run.checkpoint} (step {run.step}), prompt of {len(ids)} tokens"
    (out / "batch_dependence.md").write_text(results_markdown(results, title))
    plot_results(results, out / "batch_dependence.png")
    print(results_markdown(results, title))
    print(f"wrote {out}/batch_dependence.json, .md, .png")
    return 0

