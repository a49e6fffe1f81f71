"""Where held-out composition fails: a cross-attention readout on frozen features.

    python scripts/vision_probe.py --config configs/vision_tiny.yaml [--features oracle,latents]

Options: --help. Code: moe/cli/vision_probe.py and moe/vision/probe.py; installed as the
moe-vision-probe command.
"""

from moe.cli.vision_probe import main

if __name__ == "__main__":
    raise SystemExit(main())
