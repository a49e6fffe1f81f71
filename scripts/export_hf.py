"""Export a training checkpoint to a Hugging Face Mixtral folder.

    python scripts/export_hf.py --checkpoint runs/tiny[/checkpoints/step_00000300] --out hf/tiny

Needs ``pip install transformers``. Load the result with
``transformers.MixtralForCausalLM.from_pretrained(out)``. Mixtral is dropless: a model with
``model.eval_capacity_factor`` set is exported with a warning, and its logits match ours only on
inputs where no token is dropped (see moe/export.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.checkpoint import load_checkpoint_model  # noqa: E402
from moe.export import ExportError, export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its latest checkpoint), a step folder or state.pt")
    parser.add_argument("--out", required=True, help="output folder for save_pretrained")
    parser.add_argument("--bos-token-id", type=int, default=None)
    parser.add_argument("--eos-token-id", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("bos_token_id", args.bos_token_id),
                                   ("eos_token_id", args.eos_token_id)) if v is not None}
    try:
        model = load_checkpoint_model(args.checkpoint)
        out = export_hf(model, args.out, **overrides)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
