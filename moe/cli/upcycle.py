"""Upcycle a dense model into an MoE: each expert a copy of its feed-forward, a fresh router.

    python scripts/upcycle.py SRC --out runs/upcycled --model.n_experts=8 --model.top_k=2
        [--granularity 1] [--noise 0.01] [--seed 0] [--section.key=value ...]

SRC is our run folder (or step folder) of a dense model (every layer a dense FFN, or MoE
layers of one expert), or a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder. The
result is a run folder with the source's attention, norms, embeddings, head and tokenizer;
with renormalised top-k weights (the default here), no noise and no dropping (e.g.
``--model.capacity_factor=null``) its logits are the dense model's. Train it with
``--train.init_from=runs/upcycled`` (moe/upcycle/upcycle.py says what is copied), or skip this
command: ``--train.init_from=upcycle:SRC`` upcycles to the run's own model config.

``--granularity g`` (granular upcycling): each expert is a 1/g slice of a copy of the FFN, so
``--model.n_experts`` and ``--model.top_k`` count slices (multiples of g: 8 experts top-2 at
g=2 are 4 copies, 1 chosen per token); still exact at initialisation.
"""

from __future__ import annotations

import argparse
import sys

from moe.checkpoint import CheckpointError
from moe.config import ConfigError
from moe.hf.import_hf import HFImportError
from moe.upcycle import UpcycleError, upcycle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Any config key can be set as --section.key=value.")
    parser.add_argument("source", help="our dense run folder, or a Hugging Face Llama / Qwen2 "
                                       "folder")
    parser.add_argument("--out", required=True, help="the run folder to write (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="draws the fresh routers (and noise)")
    parser.add_argument("--granularity", type=int, default=1,
                        help="slices per FFN copy: experts of hidden/g units (default 1)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="each expert's copy times 1 + noise * N(0, 1) (default 0: exact)")
    args, overrides = parser.parse_known_args(argv)
    try:
        out = upcycle(args.source, args.out, overrides, args.seed, args.noise, args.granularity)
    except (UpcycleError, HFImportError, ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return 0
