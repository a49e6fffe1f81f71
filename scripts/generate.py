"""Sample from a trained model in one process (any checkpoint layout).

    python scripts/generate.py --run runs/tiny --prompt "def " [--tokens 200]
        [--temperature 0.8] [--top-k 50] [--seed 0] [--checkpoint PATH]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe.checkpoint import CheckpointError, load_trained_model  # noqa: E402
from moe.data import prepare_data  # noqa: E402
from moe.generate import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder (train.run_dir)")
    parser.add_argument("--checkpoint", default=None, help="a step folder (default: latest)")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        model, cfg = load_trained_model(args.checkpoint or args.run)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tokenizer = prepare_data(cfg).tokenizer
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    out = generate(model, torch.tensor([ids]), args.tokens, model.cfg.max_seq_len,
                   args.temperature, args.top_k, torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
