"""How many binding questions a vision run needs to learn them (issue 25):
python scripts/vision_binding.py --run runs/vision_tiny [--batch 16,64] [--features oracle]

Options: --help. Code: moe/cli/vision_binding.py and moe/vision/binding_lm.py; installed as the
moe-vision-binding command.
"""

from moe.cli.vision_binding import main

if __name__ == "__main__":
    raise SystemExit(main())
