"""Train a model: python scripts/train.py --config configs/tiny.yaml [--section.key=value ...]"""

from moe.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
