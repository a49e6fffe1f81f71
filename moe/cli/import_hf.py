"""Import a Hugging Face MoE folder (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE) as a run folder.

    python scripts/import_hf.py DIR --out runs/mixtral [--max-seq-len 4096]

Needs ``pip install transformers``. DIR is a ``save_pretrained`` folder (config.json, the
weights, and tokenizer.json if it has one; nothing is downloaded). The run folder holds
config.yaml, a step-0 checkpoint and the folder's tokenizer, so every command that takes
``--run`` reads it (generate, serve, routing report, batch dependence, eval-context, export);
a new training run starts from it with ``--train.init_from=runs/mixtral`` (or
``train.init_from: hf:DIR`` directly). What our model cannot express (a sliding window, an
activation other than silu, an unknown rope type, ...) stops the import with one line naming
it (moe/hf/import_hf.py lists the mapping and the refusals).
"""

from __future__ import annotations

import argparse
import sys

from moe.config import ConfigError
from moe.hf.import_hf import HFImportError, import_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a Hugging Face model folder (save_pretrained output)")
    parser.add_argument("--out", required=True, help="the run folder to write (new or empty)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="model.max_seq_len (default: max_position_embeddings)")
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.folder, args.out, args.max_seq_len)
    except (HFImportError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return 0
