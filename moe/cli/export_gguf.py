"""Export a training checkpoint to one GGUF file for llama.cpp (its llama architecture with
experts, as llama.cpp's convert_hf_to_gguf.py writes Mixtral), tokenizer included.

    python scripts/export_gguf.py --run runs/tiny --out tiny.gguf [--dtype f32|f16|q8_0]
        [--checkpoint runs/tiny/checkpoints/step_00000300] [--tokenizer PATH/tokenizer.json]

Then ``llama-cli -m tiny.gguf`` (or llama-simple, llama-server, ollama, ...). Norms and routers
stay f32 whatever ``--dtype`` says. A run llama.cpp's llama cannot compute (q/k norm, shared
experts, dense layers, ...; moe/hf/gguf.py), a tokenizer other than our byte-level BPE, or an
``--out`` that exists stops with a one-line error and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

from moe.checkpoint import CheckpointError
from moe.cli import add_model_source, model_source
from moe.hf.gguf import DTYPES, ExportError, export_gguf_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(parser)
    parser.add_argument("--out", required=True, help="the .gguf file to write (must not exist)")
    parser.add_argument("--dtype", default="f16", choices=list(DTYPES),
                        help="type of the weight matrices (norms and routers stay f32)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: the run's, from its folder or data cache)")
    args = parser.parse_args(argv)
    try:
        out = export_gguf_checkpoint(model_source(args), args.out, args.dtype, args.tokenizer)
    except (ExportError, FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    return 0
