"""Parameter / FLOP / KV-cache accounting for a config, and per GPU for a parallel layout.

    python scripts/count_params.py --config configs/gpt4.yaml [--section.key=value ...] [--json]
    python scripts/count_params.py --config configs/gpt4.yaml --parallel.tp=8 --parallel.pp=16

Prints a table by default, or one JSON object with ``--json``. Counts come from building the
model on the meta device (see ``moe/accounting/params.py`` for the definitions, the FLOP context
convention and the layout rules). Attention FLOPs use ``data.seq_len``.

Layout mode: the parallel.* keys of the config (tp, pp, dp, ep, pp_layers, pp_schedule,
dp_shard) give the layout; the table shows it when the world size is above 1 (or with
``--layout``), and the JSON always has ``params_per_gpu``, ``params_per_node``, the per-GPU bytes
(weights, gradients, AdamW state with and without ZeRO-1, all three under FSDP) and KV cache
per token per GPU, all for the most loaded rank / node, plus the full breakdown under
``layout``. A layout that
``ParallelDims.validate`` refuses (e.g. n_heads not divisible by tp) is counted as an uneven
split: the table lists why (``warning:`` lines on stderr with ``--json``); ``--strict`` makes
it an error instead.

Long context: a last section (JSON: ``long_context``) gives one sequence's KV cache and
training activation memory (none / full activation checkpointing, and what unfused attention
scores would add) at each of ``--context-lengths`` (default 8192,32768: GPT-4's reported 8k
pre-training and 32k fine-tuned contexts); moe/accounting/context.py says what is counted.

A config error prints ``error: <message>`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from moe.accounting.context import ContextMemory, context_memory
from moe.accounting.layout import LayoutAccounting, layout_accounting
from moe.accounting.params import Accounting, account, format_bytes, format_count, format_gb
from moe.accounting.serving import ServingMemory, serving_memory
from moe.config import Config, ConfigError, load_config


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
    parser.add_argument("--layout", action="store_true",
                        help="show the per-GPU layout table also when the world size is 1")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="consecutive ranks per node for params_per_node (default 8)")
    parser.add_argument("--weight-bytes", type=int, default=2,
                        help="bytes per weight on the GPU (default 2: bf16/fp16)")
    parser.add_argument("--grad-bytes", type=int, default=2,
                        help="bytes per gradient element (default 2: bf16; 4: fp32)")
    parser.add_argument("--context-lengths", default="8192,32768",
                        help="sequence lengths for the long-context memory lines (KV cache and "
                             "training activations per sequence; default 8192,32768)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 2 if ParallelDims.validate refuses the layout")
    return parser.parse_known_args(argv)


def _ranges(layers: Sequence[int]) -> str:
    """(0, 1, 2, 5, 6) -> '0-2, 5-6'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ", ".join(out) or "none"


def layout_table(cfg: Config, lay: LayoutAccounting) -> str:
    m = cfg.model
    c = lay.rank_coords
    sizes = [len(x) for x in lay.stage_layers]
    runs, i = [], 0
    while i < len(sizes):  # 7,7,8 -> "7 x2, 8"
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        runs.append(f"{sizes[i]}" + (f" x{j - i}" if j - i > 1 else ""))
        i = j
    extras = [e for e, on in (("embedding", lay.rank_has_embedding),
                              ("final norm + output head", lay.rank_has_head)) if on]
    cat = lay.params_per_gpu_by_category
    pct = (lambda n: f"{100 * n / lay.params_per_gpu:5.1f}%") if lay.params_per_gpu else str
    attn_note = (f"wq/wo split over tp={lay.tp}; K/V " +
                 ("replicated on every tp rank (MQA)" if lay.kv_replicated_over_tp
                  else f"split over tp={lay.tp}"))
    expert_note = (f"{-(-m.n_experts // lay.ep)} of {m.n_experts} experts (ep={lay.ep}), "
                   f"hidden {-(-m.expert_hidden // lay.tp)} of {m.expert_hidden} (tp={lay.tp})")
    if lay.kv_replicated_over_tp:
        kv_note = (f"the {'MQA K/V head' if m.n_kv_heads == 1 else 'K/V heads'} replicated on "
                   f"each of {lay.tp} tp ranks")
    else:
        kv_note = f"{m.n_kv_heads // lay.tp} of {m.n_kv_heads} KV heads on the rank"
    zero_div = f"dense over dp x ep = {lay.dp * lay.ep}, experts over dp = {lay.dp}"
    rows = [
        ("layout", f"tp {lay.tp} x pp {lay.pp} x dp {lay.dp} x ep {lay.ep} = {lay.world_size} "
                   f"GPUs, {lay.gpus_per_node} per node ({lay.n_nodes} node"
                   f"{'s' if lay.n_nodes > 1 else ''}), dp_shard {lay.dp_shard}"),
        ("  pipeline stages", f"{len(sizes)} ({lay.pp_schedule}): layers per stage "
                              f"{', '.join(runs)}; embedding on stage 0, head on stage "
                              f"{lay.pp - 1}"),
        ("  valid", "yes (ParallelDims.validate)" if lay.valid else "NO: see the warnings"),
        *[("  warning", w) for w in lay.warnings],
        ("most loaded GPU", f"rank {lay.rank} (pp {c['pp']}, dp {c['dp']}, ep {c['ep']}, "
                            f"tp {c['tp']}): layers {_ranges(lay.rank_layers)}"
                            f"{' + ' + ' + '.join(extras) if extras else ''}"),
        ("  params / GPU", f"{format_count(lay.params_per_gpu):>8}  ({lay.params_per_gpu:,}); "
                           f"least loaded {format_count(lay.params_per_gpu_min)}, mean "
                           f"{format_count(lay.params_per_gpu_mean)}"),
        ("    attention", f"{format_count(cat['attention']):>8}  {pct(cat['attention'])}  "
                          f"({attn_note})"),
        ("    experts", f"{format_count(cat['expert']):>8}  {pct(cat['expert'])}  "
                        f"({expert_note})"),
        ("    router", f"{format_count(cat['router']):>8}  {pct(cat['router'])}  (replicated)"),
        ("    dense FFN", f"{format_count(cat['dense_ffn']):>8}  {pct(cat['dense_ffn'])}"),
        *([("    shared experts", f"{format_count(cat['shared_expert']):>8}  "
                                  f"{pct(cat['shared_expert'])}")] if cat['shared_expert'] else []),
        ("    embeddings", f"{format_count(cat['embedding']):>8}  {pct(cat['embedding'])}  "
                           f"(replicated over tp)"),
        ("    norms", f"{format_count(cat['norm']):>8}  {pct(cat['norm'])}"),
        (f"  weights ({lay.weight_bytes} B)", f"{format_gb(lay.weight_bytes_per_gpu)}  "
                                              f"(dp_shard {lay.dp_shard}: only fsdp shards it)"),
        (f"  gradients ({lay.grad_bytes} B)", f"{format_gb(lay.grad_bytes_per_gpu)}  "
                                              f"(dp_shard {lay.dp_shard}: only fsdp shards it)"),
        ("  AdamW state (12 B)", f"{format_gb(lay.optimizer_bytes_per_gpu_no_zero1)}  "
                                 f"(fp32 master + exp_avg + exp_avg_sq)"),
        ("    with zero1", f"{format_gb(lay.optimizer_bytes_per_gpu_zero1)}  ({zero_div})"),
        ("  weights+grads+AdamW", f"{format_gb(lay.train_state_bytes_per_gpu)}  (dp_shard "
                                  f"{lay.dp_shard}; activations not counted)"),
        ("    with fsdp", f"{format_gb(lay.train_state_bytes_per_gpu_fsdp)}  (all three "
                          f"sharded: {zero_div})"),
        ("  KV cache / token", f"{format_bytes(lay.kv_cache_bytes_per_token_per_gpu)}  "
                               f"({len(lay.rank_layers)} layers, {kv_note})"),
        (f"per node ({lay.gpus_per_node} GPUs)",
         f"{format_count(lay.params_per_node):>8}  ({lay.params_per_node:,}) on node {lay.node} "
         f"(ranks {lay.node_ranks[0]}-{lay.node_ranks[1]}, pp stage"
         f"{'s' if len(lay.node_pp_stages) > 1 else ''} "
         f"{', '.join(map(str, lay.node_pp_stages))}); least loaded node "
         f"{format_count(lay.params_per_node_min)}"),
        ("", "distinct parameters: an element held by several GPUs of the node counts once"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def table(cfg: Config, acc: Accounting) -> str:
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
        *([("  shared experts", f"{format_count(p.shared_expert_params):>8}  "
                                f"{pct(p.shared_expert_params)}  (always active)")]
          if p.shared_expert_params else []),
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


def long_context_table(rows: list[ContextMemory]) -> str:
    """KV cache and training-activation memory of one sequence at each --context-lengths
    (moe/accounting/context.py says what is counted)."""
    if not rows:
        return "long context: no --context-lengths"
    head = ("tokens", "KV cache", "KV (MHA)", "activations", "(log-probs)", "full AC",
            "+unfused scores")
    table = [head] + [(f"{r.seq_len}", format_bytes(r.kv_cache_bytes),
                       format_bytes(r.kv_cache_bytes_mha), format_bytes(r.activation_bytes),
                       format_bytes(r.logits_bytes), format_bytes(r.activation_bytes_full_ac),
                       format_bytes(r.attention_scores_bytes)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"long context, one sequence, whole model ({rows[0].bytes_per_element} B/element; "
             "training activations, full AC = activation checkpointing; "
             "moe/accounting/context.py)"]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def serving_table(rows: list[ServingMemory], weights: str = "") -> str:
    r0 = rows[0]
    lines = [f"serving at tp{r0.tp} x pp{r0.pp} (moe/accounting/serving.py): {weights}weights "
             f"{format_gb(r0.weight_bytes_per_gpu)} per GPU, KV "
             f"{format_bytes(r0.kv_bytes_per_token_per_gpu)} per token per GPU",
             f"  {'context':>8} {'GPU':>6} {'KV/sequence/GPU':>16} {'max batch':>10} "
             f"{'bytes read / token (batch 1)':>29}"]
    for r in rows:
        lines.append(f"  {r.context:>8} {r.gpu_bytes / 1e9:>4.0f}GB "
                     f"{format_bytes(r.kv_bytes_per_sequence_per_gpu):>16} {r.max_batch:>10} "
                     f"{format_gb(r.bytes_read_per_token):>29}")
    return "\n".join(lines)


def vision_counts(cfg: Config) -> dict[str, int]:
    from moe.vision.model import vision_param_counts

    return vision_param_counts(cfg.model, cfg.vision)


def vision_table(c: dict[str, int]) -> str:
    """The vision parts (vision.enabled), counted apart from the text model above."""
    rows = [("vision params", f"{format_count(c['vision_total'])}  (beside "
                              f"{format_count(c['text_total'])} text params)"),
            ("  vision_encoder", format_count(c["vision_encoder"])),
            ("  perceiver", format_count(c["perceiver"])),
            ("  cross_attn", f"{format_count(c['cross_attn'])}  ({c['cross_attn_layers']} "
                             "gated blocks)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _context_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = [0]
    if any(n <= 0 for n in lengths):
        raise ConfigError(f"--context-lengths={text!r} must be positive integers, e.g. 8192,32768")
    return lengths


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = account(cfg.model, seq_len=cfg.data.seq_len, bytes_per_element=args.bytes_per_element,
                  method=args.method)
    try:
        lay = layout_accounting(cfg, gpus_per_node=args.gpus_per_node,
                                weight_bytes=args.weight_bytes, grad_bytes=args.grad_bytes,
                                kv_bytes_per_element=args.bytes_per_element, strict=args.strict)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        long_rows = [context_memory(cfg.model, n, args.bytes_per_element)
                     for n in _context_lengths(args.context_lengths)]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # the seeds' serving layout (tp8 x pp16) whatever cfg.parallel says
        serving = serving_memory(cfg, contexts=_context_lengths(args.context_lengths),
                                 weight_bytes=args.weight_bytes,
                                 kv_bytes_per_element=args.bytes_per_element)
        # Weight-only int8 (1 byte per weight; the per-channel scales add 2 / d_in of that,
        # 0.01% at d_model 15360, not counted), the KV cache as above.
        serving_int8 = serving_memory(cfg, contexts=_context_lengths(args.context_lengths),
                                      weight_bytes=1,
                                      kv_bytes_per_element=args.bytes_per_element)
    except ConfigError:  # a model that tp8 x pp16 cannot split (toy configs)
        serving = serving_int8 = []
    if args.json:
        for w in lay.warnings:
            print(f"warning: {w}", file=sys.stderr)
        out = {"config": args.config, **acc.to_dict()}
        out.update({k: getattr(lay, k) for k in (
            "params_per_gpu", "params_per_node", "weight_bytes_per_gpu", "grad_bytes_per_gpu",
            "optimizer_bytes_per_gpu", "optimizer_bytes_per_gpu_no_zero1",
            "optimizer_bytes_per_gpu_zero1", "train_state_bytes_per_gpu",
            "train_state_bytes_per_gpu_fsdp", "kv_cache_bytes_per_token_per_gpu")})
        out["layout"] = lay.to_dict()
        out["long_context"] = [r.to_dict() for r in long_rows]
        out["serving"] = [r.to_dict() for r in serving]
        out["serving_int8"] = [r.to_dict() for r in serving_int8]
        if cfg.vision.enabled:
            out["vision"] = vision_counts(cfg)
        print(json.dumps(out))
    else:
        print(table(cfg, acc))
        if cfg.vision.enabled:
            print()
            print(vision_table(vision_counts(cfg)))
        if lay.world_size > 1 or args.layout:
            print()
            print(layout_table(cfg, lay))
        print()
        print(long_context_table(long_rows))
        if serving:
            print()
            print(serving_table(serving, f"{args.weight_bytes}-byte "))
            print()
            print(serving_table(serving_int8, "int8 weight-only "))
    return 0

