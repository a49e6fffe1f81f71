"""Parameter, FLOP and KV-cache accounting for a :class:`~moe.config.ModelConfig`.

Parameter counts come from the model itself: :func:`count_params` builds ``Transformer`` on the
meta device (nothing is allocated, so even the 1.8T-parameter GPT-4 config builds in about a
second) and sorts every named parameter by its module name (the stable names documented in
``moe/model/transformer.py``). :func:`analytic_params` is the same breakdown written as closed
formulas; ``tests/test_accounting.py`` checks the two agree, so a change to the model that the
formulas do not know about fails a test instead of silently skewing the numbers.

Categories (they partition the parameters; tied weights are counted once)::

    embedding   tok_embeddings.weight + output.weight (one matrix when tie_embeddings)
    attention   layers.*.attention.{wq,wk,wv,wo}       (shared by all experts; with their
                                                       biases, model.qkv_bias)
    router      layers.*.feed_forward.router.*
    expert      layers.*.feed_forward.experts.*        (all experts of all MoE layers)
    dense_ffn   layers.*.feed_forward.{w1,w2,w3}       (non-MoE layers' feed-forward)
    shared_expert layers.*.feed_forward.shared_experts.* (always-on experts, DeepSeekMoE)
                and their gate, layers.*.feed_forward.shared_expert_gate (Qwen2-MoE)
    norm        layers.*.attention_norm, layers.*.ffn_norm, norm,
                layers.*.attention.{q_norm,k_norm} (model.qk_norm)

Active parameters (per token): every parameter except the experts a token is not routed to,
i.e. the experts count ``top_k / n_experts`` of their parameters; the router, the shared
experts, the embeddings and the norms count in full.

Forward FLOPs per token (multiply-add = 2 FLOPs)::

    flops = 2 * active matmul params + attention score/value FLOPs
    active matmul params = attention + router + dense_ffn + shared_expert
                           + expert * top_k / n_experts
                           + output head (vocab * d_model, also when tied)
    attention FLOPs      = 2 * 2 * n_layers * context * n_heads * head_dim
                           (q.k^T over ``context`` keys, then probs @ v)

The input-embedding lookup and the norms / softmax / activations are not counted. **Context
convention**: ``flops_per_token`` uses the *mean* context of a token in a full causal window of
``seq_len`` tokens, i.e. the token at position t (1-based) attends to t keys, so
``context = (seq_len + 1) / 2`` and the attention term is ``2 * n_layers * (seq_len + 1) *
n_heads * head_dim``. This is the per-token average for training on seq_len-token sequences and
for generating a whole seq_len window; ``flops_per_token_full_context`` is the cost of one token
that attends to a full window (``context = seq_len``, the last generated token). For the GPT-4
config (seq_len 8192) the mean-context term is ~5% of the total, the full-context term ~10%;
the public ~560 GFLOP per generated token is 2 x ~280B active parameters with attention ignored.

KV cache per token: ``2 (k and v) * n_layers * n_kv_heads * head_dim * bytes_per_element``
(default 2 bytes, fp16/bf16); ``kv_cache_bytes_per_token_mha`` is the same with
``n_kv_heads = n_heads`` (what multi-head attention would need).

The per-GPU layout of a parallel configuration (parameters, memory and KV cache per GPU and
per node) is counted in ``moe/accounting/layout.py``, beside the sharding plan it reads.

API::

    count_params(cfg, method="meta"|"analytic") -> ParamCounts
    count_model_params(model) -> ParamCounts          # any (materialised or meta) Transformer
    analytic_params(cfg) -> ParamCounts
    flops_per_token(cfg, counts=None, seq_len=None, context=None) -> int
    kv_cache_bytes_per_token(cfg, bytes_per_element=2, n_kv_heads=None) -> int
    account(cfg, seq_len=None, bytes_per_element=2, method="meta") -> Accounting
    Accounting.to_dict() / ParamCounts.to_dict()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe.config import ModelConfig

__all__ = ["ParamCounts", "Accounting", "count_params", "count_model_params", "analytic_params",
           "flops_per_token", "attention_flops_per_token", "kv_cache_bytes_per_token", "account",
           "classify_param", "format_count", "format_bytes", "format_gb", "CATEGORIES"]


@dataclass(frozen=True)
class ParamCounts:
    total_params: int
    active_params: int
    attention_params: int
    expert_params: int  # all experts of all MoE layers
    router_params: int
    dense_ffn_params: int
    embedding_params: int  # input embedding + output head, once when tied
    norm_params: int
    output_head_params: int  # vocab * d_model: the head matmul, counted in FLOPs even when tied
    n_moe_layers: int
    n_experts: int
    top_k: int
    shared_expert_params: int = 0  # always-on experts of all MoE layers (model.n_shared_experts)

    @property
    def params_per_expert(self) -> int:
        """One expert's parameters summed over all MoE layers (SemiAnalysis' "~111B per expert")."""
        return self.expert_params // self.n_experts if self.n_experts else 0

    @property
    def active_expert_params(self) -> int:
        return self.params_per_expert * self.top_k

    @property
    def active_matmul_params(self) -> int:
        """Weights a token multiplies by in the forward (input-embedding lookup excluded)."""
        return (self.attention_params + self.router_params + self.dense_ffn_params
                + self.shared_expert_params + self.active_expert_params
                + self.output_head_params)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(params_per_expert=self.params_per_expert,
                 active_expert_params=self.active_expert_params,
                 active_matmul_params=self.active_matmul_params)
        return d


@dataclass(frozen=True)
class Accounting:
    params: ParamCounts
    seq_len: int
    flops_per_token: int  # mean causal context (seq_len + 1) / 2, see the module docstring
    flops_per_token_full_context: int  # a token attending to all seq_len positions
    attention_flops_per_token: int  # the score/value part of flops_per_token
    bytes_per_element: int
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_token_mha: int  # the same model with n_kv_heads = n_heads

    def to_dict(self) -> dict:
        d = self.params.to_dict()
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "params"})
        return d


# ---------------------------------------------------------------------------------------------
# Counting by module name


CATEGORIES = ("attention", "expert", "router", "dense_ffn", "embedding", "norm", "shared_expert")


def classify_param(name: str) -> str:
    """Category of a ``Transformer`` parameter from its name; raises on an unknown name."""
    parts = name.split(".")
    if parts[0] in ("tok_embeddings", "output"):
        return "embedding"
    if parts[0] == "norm":
        return "norm"
    if parts[0] == "layers" and len(parts) >= 4:
        sub = parts[2]
        if sub in ("attention_norm", "ffn_norm"):
            return "norm"
        if sub == "attention":
            return "norm" if parts[3] in ("q_norm", "k_norm") else "attention"
        if sub == "feed_forward":
            if parts[3] == "router":
                return "router"
            if parts[3] == "experts":
                return "expert"
            if parts[3] in ("shared_experts", "shared_expert_gate"):
                return "shared_expert"
            if parts[3] in ("w1", "w2", "w3"):
                return "dense_ffn"
    raise ValueError(f"accounting does not know parameter {name!r}: update "
                     "moe/accounting/params.py")


def _finish(cfg: ModelConfig, sums: dict, output_head: int, n_moe: int) -> ParamCounts:
    total = sum(sums[c] for c in CATEGORIES)
    experts = sums["expert"]
    if cfg.n_experts and experts % cfg.n_experts:
        raise ValueError(f"expert parameters {experts} not divisible by n_experts={cfg.n_experts}")
    active = total - experts + (experts // cfg.n_experts * cfg.top_k if cfg.n_experts else 0)
    return ParamCounts(total_params=total, active_params=active,
                       attention_params=sums["attention"], expert_params=experts,
                       router_params=sums["router"], dense_ffn_params=sums["dense_ffn"],
                       embedding_params=sums["embedding"], norm_params=sums["norm"],
                       output_head_params=output_head, n_moe_layers=n_moe,
                       n_experts=cfg.n_experts, top_k=cfg.top_k,
                       shared_expert_params=sums["shared_expert"])


def count_model_params(model: nn.Module) -> ParamCounts:
    """Counts for a built ``Transformer`` (meta or real): walks ``named_parameters()``.

    ``named_parameters`` yields a tied weight once (under ``tok_embeddings``), so tied
    embeddings count once. A pipeline stage without some modules counts what it holds.
    """
    cfg: ModelConfig = model.cfg
    sums = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():
        sums[classify_param(name)] += p.numel()
    out = getattr(model, "output", None)
    output_head = out.weight.numel() if out is not None else 0
    from moe.model.moe import MoE

    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    return _finish(cfg, sums, output_head, n_moe)


def count_params(cfg: ModelConfig, method: str = "meta") -> ParamCounts:
    """Counts for ``cfg``: ``meta`` builds the model on the meta device and walks its
    parameters (the source of truth); ``analytic`` uses :func:`analytic_params`."""
    if method == "analytic":
        return analytic_params(cfg)
    if method != "meta":
        raise ValueError(f"unknown counting method {method!r}: use meta or analytic")
    from moe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return count_model_params(model)


def analytic_params(cfg: ModelConfig) -> ParamCounts:
    """The same breakdown as :func:`count_params`, from closed formulas."""
    d, hd, L = cfg.d_model, cfg.head_size, cfg.n_layers
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    n_dense = L - n_moe
    mats = 3 if cfg.activation == "swiglu" else 2  # w1, w2 (+ w3 for SwiGLU)
    attn_layer = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    if cfg.qkv_bias:
        attn_layer += (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    qk_norm = {"none": 0, "head": 2 * hd,
               "projection": (cfg.n_heads + cfg.n_kv_heads) * hd}[cfg.qk_norm]
    sums = {
        "attention": L * attn_layer,
        "router": n_moe * d * cfg.n_experts,
        "expert": n_moe * cfg.n_experts * mats * d * cfg.expert_hidden,
        "dense_ffn": n_dense * mats * d * cfg.ffn_hidden,
        "shared_expert": n_moe * (mats * d * cfg.shared_hidden_total
                                  + (d if cfg.shared_expert_gate else 0)),
        "embedding": (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d,
        "norm": (2 * L + 1) * d + L * qk_norm,
    }
    return _finish(cfg, sums, cfg.vocab_size * d, n_moe)


# ---------------------------------------------------------------------------------------------
# FLOPs and KV cache


def attention_flops_per_token(cfg: ModelConfig, seq_len: int | None = None,
                              context: float | None = None) -> int:
    """Score (q.k^T) + value (probs @ v) FLOPs of one token: 2 * 2 * n_layers * context *
    n_heads * head_dim. ``context`` defaults to the mean causal context of a full window,
    (seq_len + 1) / 2, with seq_len defaulting to ``cfg.max_seq_len``."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    per_key = 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_size
    if context is None:  # mean of 1..seq_len, kept exact: per_key * (seq_len + 1) / 2
        return per_key // 2 * (seq_len + 1)
    return round(per_key * context)


def flops_per_token(cfg: ModelConfig, counts: ParamCounts | None = None,
                    seq_len: int | None = None, context: float | None = None) -> int:
    """Forward FLOPs per token: 2 * active matmul params + attention score/value FLOPs.

    Context convention: see :func:`attention_flops_per_token` (default: mean causal context
    (seq_len + 1) / 2; pass ``context=seq_len`` for a token attending to a full window)."""
    counts = count_params(cfg) if counts is None else counts
    return 2 * counts.active_matmul_params + attention_flops_per_token(cfg, seq_len, context)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2,
                             n_kv_heads: int | None = None) -> int:
    """2 (k, v) * n_layers * n_kv_heads * head_dim * bytes_per_element; ``n_kv_heads``
    defaults to the config's (pass ``cfg.n_heads`` for the multi-head equivalent)."""
    kv = cfg.n_kv_heads if n_kv_heads is None else n_kv_heads
    return 2 * cfg.n_layers * kv * cfg.head_size * bytes_per_element


def account(cfg: ModelConfig, seq_len: int | None = None, bytes_per_element: int = 2,
            method: str = "meta") -> Accounting:
    """Everything at once. ``seq_len`` defaults to ``cfg.max_seq_len`` (the script passes
    ``data.seq_len``)."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    counts = count_params(cfg, method)
    return Accounting(
        params=counts, seq_len=seq_len,
        flops_per_token=flops_per_token(cfg, counts, seq_len),
        flops_per_token_full_context=flops_per_token(cfg, counts, seq_len, context=seq_len),
        attention_flops_per_token=attention_flops_per_token(cfg, seq_len),
        bytes_per_element=bytes_per_element,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(cfg, bytes_per_element),
        kv_cache_bytes_per_token_mha=kv_cache_bytes_per_token(cfg, bytes_per_element,
                                                              n_kv_heads=cfg.n_heads))


# ---------------------------------------------------------------------------------------------
# Formatting


def format_count(n: float, unit: str = "") -> str:
    """1.8e12 -> '1.80T', 2.8e11 -> '280B', 5.6e11 with unit 'FLOP' -> '560 GFLOP'."""
    prefixes = (("T", 1e12), ("G" if unit else "B", 1e9), ("M", 1e6), ("k" if unit else "K", 1e3))
    for p, scale in prefixes:
        if abs(n) >= scale:
            v = n / scale
            digits = 2 if v < 10 else 1 if v < 100 else 0
            return f"{v:.{digits}f}{' ' if unit else ''}{p}{unit}"
    return f"{n:g}{' ' + unit if unit else ''}"


def format_bytes(n: float) -> str:
    """Binary units: 61440 -> '60.0 KiB'."""
    for p, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {p}"
    return f"{n:g} B"


def format_gb(n: float) -> str:
    """Decimal gigabytes with the binary size beside: 29.7e9 -> '29.7 GB (27.7 GiB)';
    below 1 GB in megabytes: 7.5e8 -> '750 MB (715 MiB)'."""
    if abs(n) < 1e9:
        return f"{n / 1e6:.0f} MB ({n / 2**20:.0f} MiB)"
    return f"{n / 1e9:.1f} GB ({n / 2**30:.1f} GiB)"
