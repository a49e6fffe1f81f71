"""Export a training checkpoint to a Hugging Face folder (Mixtral, Qwen3-MoE, OLMoE or
Qwen2-MoE: the family that expresses it exactly), tokenizer included.

    python scripts/export_hf.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out hf/tiny
        [--tokenizer data/cache/builtin-<fingerprint>/tokenizer.json] [--family auto]

Needs ``pip install transformers``. The tokenizer is the run's, found in its data cache
(``data.cache_dir``, relative to where training ran) unless ``--tokenizer`` names one. Load the
result with ``AutoTokenizer.from_pretrained(out)`` and
``AutoModelForCausalLM.from_pretrained(out)``, or ``pipeline("text-generation", model=out)``.
``--family auto`` picks the first family that expresses every option of the run
(moe/hf/families.py) and refuses, naming each family's reason, when none does. The families
are dropless: a model with ``model.eval_capacity_factor`` set is exported with a warning, and
its logits match ours only on inputs where no token is dropped (see moe/hf/export.py).
"""

from __future__ import annotations

import argparse
import sys

from moe.checkpoint import CheckpointError
from moe.hf.export import ExportError, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its latest checkpoint), a step folder or a "
                             "consolidated .pt file")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--family", default="auto",
                        choices=["auto", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe"],
                        help="Hugging Face family (auto: the first that expresses the model "
                             "exactly; moe/hf/families.py)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: the run's, from its data cache)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.tokenizer, args.family)
    except (ExportError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return 0

