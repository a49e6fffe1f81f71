"""Parameter / FLOP / KV-cache accounting for a config.

    python scripts/count_params.py --config configs/gpt4.yaml [--section.key=value ...] [--json]

Prints a table by default, or one JSON object with ``--json``. Counts come from building the
model on the meta device (see ``moe/accounting.py`` for the definitions and the FLOP context
convention). Attention FLOPs use ``data.seq_len``. A config error prints ``error: <message>``
on stderr and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

from moe.accounting import account, format_bytes, format_count  # noqa: E402
from moe.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any other --section.key=value argument overrides the config.")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--bytes-per-element", type=int, default=2,
                        help="KV-cache element size in bytes (default 2: fp16/bf16)")
    parser.add_argument("--method", choices=("meta", "analytic"), default="meta",
                        help="meta: walk the model built on the meta device; analytic: formulas")
    return parser.parse_known_args(argv)


def table(cfg, acc) -> str:
    m, p = cfg.model, acc.params
    pct = (lambda n: f"{100 * n / p.total_params:5.1f}%") if p.total_params else (lambda n: "")
    attn = ("MQA" if m.n_kv_heads == 1 else "MHA" if m.n_kv_heads == m.n_heads else "GQA")
    kv_seq, kv_seq_mha = (acc.kv_cache_bytes_per_token * acc.seq_len,
                          acc.kv_cache_bytes_per_token_mha * acc.seq_len)
    rows = [
        ("model", f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads x {m.head_size} "
                  f"({attn}, {m.n_kv_heads} kv), {p.n_moe_layers} MoE layers x {m.n_experts} "
                  f"experts (top-{m.top_k}), expert_hidden {m.expert_hidden}, "
                  f"vocab {m.vocab_size}"),
        ("", ""),
        ("total params", f"{format_count(p.total_params):>8}  ({p.total_params:,})"),
        ("active params / token", f"{format_count(p.active_params):>8}  ({p.active_params:,})"),
        ("  attention", f"{format_count(p.attention_params):>8}  {pct(p.attention_params)}"),
        ("  experts (all)", f"{format_count(p.expert_params):>8}  {pct(p.expert_params)}"),
        ("    per expert", f"{format_count(p.params_per_expert):>8}  (all layers)"),
        ("  router", f"{format_count(p.router_params):>8}  {pct(p.router_params)}"),
        ("  dense FFN", f"{format_count(p.dense_ffn_params):>8}  {pct(p.dense_ffn_params)}"),
        ("  embeddings", f"{format_count(p.embedding_params):>8}  {pct(p.embedding_params)}"
                         f"{'  (tied)' if m.tie_embeddings else ''}"),
        ("  norms", f"{format_count(p.norm_params):>8}  {pct(p.norm_params)}"),
        ("", ""),
        ("forward FLOPs / token", f"{format_count(acc.flops_per_token, 'FLOP')}  (mean causal "
                                   f"context over seq_len {acc.seq_len}; attention "
                                   f"{format_count(acc.attention_flops_per_token, 'FLOP')})"),
        ("  at full context", f"{format_count(acc.flops_per_token_full_context, 'FLOP')}"),
        ("KV cache / token", f"{format_bytes(acc.kv_cache_bytes_per_token)}  "
                              f"({acc.bytes_per_element} B/element, {m.n_kv_heads} kv heads)"),
        ("  with MHA", f"{format_bytes(acc.kv_cache_bytes_per_token_mha)}  "
                       f"({m.n_heads} kv heads)"),
        ("  per seq_len sequence", f"{format_bytes(kv_seq)}  (MHA {format_bytes(kv_seq_mha)})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = account(cfg.model, seq_len=cfg.data.seq_len, bytes_per_element=args.bytes_per_element,
                  method=args.method)
    if args.json:
        out = {"config": args.config, **acc.to_dict()}
        print(json.dumps(out))
    else:
        print(table(cfg, acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
