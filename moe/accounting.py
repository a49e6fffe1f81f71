"""Parameter, FLOP and KV-cache accounting for a :class:`~moe.config.ModelConfig`.

Parameter counts come from the model itself: :func:`count_params` builds ``Transformer`` on the
meta device (nothing is allocated, so even the 1.8T-parameter GPT-4 config builds in about a
second) and sorts every named parameter by its module name (the stable names documented in
``moe/model/transformer.py``). :func:`analytic_params` is the same breakdown written as closed
formulas; ``tests/test_accounting.py`` checks the two agree, so a change to the model that the
formulas do not know about fails a test instead of silently skewing the numbers.

Categories (they partition the parameters; tied weights are counted once)::

    embedding   tok_embeddings.weight + output.weight (one matrix when tie_embeddings)
    attention   layers.*.attention.{wq,wk,wv,wo}       (shared by all experts)
    router      layers.*.feed_forward.router.*
    expert      layers.*.feed_forward.experts.*        (all experts of all MoE layers)
    dense_ffn   layers.*.feed_forward.{w1,w2,w3}       (non-MoE layers' feed-forward)
    norm        layers.*.attention_norm, layers.*.ffn_norm, norm

Active parameters (per token): every parameter except the experts a token is not routed to,
i.e. the experts count ``top_k / n_experts`` of their parameters; the router, the embeddings
and the norms count in full.

Forward FLOPs per token (multiply-add = 2 FLOPs)::

    flops = 2 * active matmul params + attention score/value FLOPs
    active matmul params = attention + router + dense_ffn + expert * top_k / n_experts
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

Per-GPU layout (:func:`layout_accounting`, ``scripts/count_params.py --parallel.tp=8 ...``).
A rank's parameters follow the trainer's sharding (moe/parallel/{mesh,tensor,expert}.py and the
pipeline split rule)::

    pipeline  layers split over pp stages: parallel.pp_layers, else as even as possible with the
              remainder on the LATER stages (120 layers / 16 stages: 7 x 8 then 8 x 8). With
              interleaved_1f1b there are pp * pp_stages_per_rank virtual stages and pp rank r
              holds virtual stages r, r + pp, ... . The first (virtual) stage also holds
              tok_embeddings, the last one the final norm and the output head.
    tp        attention.wq rows / wo columns: whole query heads, n_heads / tp per rank;
              wk / wv: split by KV head when n_kv_heads % tp == 0, else (multi-query,
              n_kv_heads = 1) REPLICATED on every tp rank; experts.w1/w3 dim 2 and w2 dim 1
              (each expert's hidden units), dense w1/w3 dim 0 and w2 dim 1; router, norms,
              tok_embeddings and output replicated.
    ep        experts.w1/w2/w3 dim 0: n_experts / ep experts per rank.
    dp        replicates everything.

Ranks are numbered with the mesh order ("pp", "dp", "ep", "tp"), tp innermost:
``rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i``. The **most loaded GPU** is the rank
holding the most parameters (ties: the lowest rank); every per-GPU number is that rank's. A
**node** is ``gpus_per_node`` (8) consecutive ranks; ``params_per_node`` counts the parameters
the node's ranks hold, each element ONCE however many of its ranks hold a copy (tp-replicated
norms / router / MQA K/V / embeddings, dp replicas), for the most loaded node. With tp = 8 a
node is one tp group = one pipeline stage, so params_per_node is one stage's parameters.

Memory convention (mixed-precision AdamW, Megatron style): weights ``weight_bytes`` (2: bf16 /
fp16) per parameter; gradients ``grad_bytes`` per parameter (2: bf16, the default; 4 for fp32
gradient accumulation), never sharded (ZeRO-1 shards only optimizer state); optimizer state
12 bytes per parameter (fp32 master weights 4 + exp_avg 4 + exp_avg_sq 4). With ZeRO-1
(parallel.zero1) the state of dense (non-expert) parameters is split over dp * ep ranks and
that of expert parameters over dp ranks (ceil). Activations and temporary buffers are not
counted. (This repository's trainer keeps fp32 parameters under bf16 autocast: 4 + 4 grad + 8
Adam = the same 16 bytes per parameter without ZeRO.) KV cache per token per GPU: 2 * (layers
on the rank) * (KV heads on the rank) * head_dim * bytes; with multi-query attention the one
K/V head is replicated on every tp rank, so each tp rank holds the full KV of its layers.

A layout the trainer would refuse (``ParallelDims.validate``, e.g. n_heads not divisible by tp)
is still counted where that is meaningful, assuming an uneven split with the extra heads /
units / experts on the first ranks; the refusals are listed in ``warnings`` (``valid`` is then
False). Batch-size errors are reported separately (they do not affect the counts). A pipeline
split that cannot exist (pp_layers not matching, fewer layers than stages, tied embeddings with
pp > 1) raises ConfigError.

API::

    count_params(cfg, method="meta"|"analytic") -> ParamCounts
    count_model_params(model) -> ParamCounts          # any (materialised or meta) Transformer
    analytic_params(cfg) -> ParamCounts
    flops_per_token(cfg, counts=None, seq_len=None, context=None) -> int
    kv_cache_bytes_per_token(cfg, bytes_per_element=2, n_kv_heads=None) -> int
    account(cfg, seq_len=None, bytes_per_element=2, method="meta") -> Accounting
    Accounting.to_dict() / ParamCounts.to_dict()
    layout_accounting(cfg: Config, gpus_per_node=8, weight_bytes=2, grad_bytes=2,
                      kv_bytes_per_element=2, strict=False) -> LayoutAccounting
    stage_layers(model_cfg, parallel_cfg) -> list of per-pp-rank layer-index tuples
    params_per_rank(cfg: Config) -> {(pp_rank, ep_rank, tp_rank): {category: count}}
    LayoutAccounting.to_dict()
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from moe.config import Config, ConfigError, ModelConfig, ParallelConfig

__all__ = ["ParamCounts", "Accounting", "count_params", "count_model_params", "analytic_params",
           "flops_per_token", "attention_flops_per_token", "kv_cache_bytes_per_token", "account",
           "classify_param", "format_count", "format_bytes", "format_gb", "LayoutAccounting",
           "layout_accounting", "params_per_rank", "stage_layers", "ADAM_BYTES_PER_PARAM"]


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

    @property
    def params_per_expert(self) -> int:
        """One expert's parameters summed over all MoE layers (SemiAnalysis' "~111B per expert")."""
        return self.expert_params // self.n_experts

    @property
    def active_expert_params(self) -> int:
        return self.params_per_expert * self.top_k

    @property
    def active_matmul_params(self) -> int:
        """Weights a token multiplies by in the forward (input-embedding lookup excluded)."""
        return (self.attention_params + self.router_params + self.dense_ffn_params
                + self.active_expert_params + self.output_head_params)

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


_CATEGORIES = ("attention", "expert", "router", "dense_ffn", "embedding", "norm")


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
            return "attention"
        if sub == "feed_forward":
            if parts[3] == "router":
                return "router"
            if parts[3] == "experts":
                return "expert"
            if parts[3] in ("w1", "w2", "w3"):
                return "dense_ffn"
    raise ValueError(f"accounting does not know parameter {name!r}: update moe/accounting.py")


def _finish(cfg: ModelConfig, sums: dict, output_head: int, n_moe: int) -> ParamCounts:
    total = sum(sums[c] for c in _CATEGORIES)
    experts = sums["expert"]
    if experts % cfg.n_experts:
        raise ValueError(f"expert parameters {experts} not divisible by n_experts={cfg.n_experts}")
    active = total - experts + experts // cfg.n_experts * cfg.top_k
    return ParamCounts(total_params=total, active_params=active,
                       attention_params=sums["attention"], expert_params=experts,
                       router_params=sums["router"], dense_ffn_params=sums["dense_ffn"],
                       embedding_params=sums["embedding"], norm_params=sums["norm"],
                       output_head_params=output_head, n_moe_layers=n_moe,
                       n_experts=cfg.n_experts, top_k=cfg.top_k)


def count_model_params(model: nn.Module) -> ParamCounts:
    """Counts for a built ``Transformer`` (meta or real): walks ``named_parameters()``.

    ``named_parameters`` yields a tied weight once (under ``tok_embeddings``), so tied
    embeddings count once. A pipeline stage without some modules counts what it holds.
    """
    cfg: ModelConfig = model.cfg
    sums = dict.fromkeys(_CATEGORIES, 0)
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
    sums = {
        "attention": L * attn_layer,
        "router": n_moe * d * cfg.n_experts,
        "expert": n_moe * cfg.n_experts * mats * d * cfg.expert_hidden,
        "dense_ffn": n_dense * mats * d * cfg.ffn_hidden,
        "embedding": (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * d,
        "norm": (2 * L + 1) * d,
    }
    return _finish(cfg, sums, cfg.vocab_size * d, n_moe)


# ---------------------------------------------------------------------------------------------
# FLOPs and KV cache


def attention_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None,
                              context: Optional[float] = None) -> int:
    """Score (q.k^T) + value (probs @ v) FLOPs of one token: 2 * 2 * n_layers * context *
    n_heads * head_dim. ``context`` defaults to the mean causal context of a full window,
    (seq_len + 1) / 2, with seq_len defaulting to ``cfg.max_seq_len``."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    per_key = 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_size
    if context is None:  # mean of 1..seq_len, kept exact: per_key * (seq_len + 1) / 2
        return per_key // 2 * (seq_len + 1)
    return round(per_key * context)


def flops_per_token(cfg: ModelConfig, counts: Optional[ParamCounts] = None,
                    seq_len: Optional[int] = None, context: Optional[float] = None) -> int:
    """Forward FLOPs per token: 2 * active matmul params + attention score/value FLOPs.

    Context convention: see :func:`attention_flops_per_token` (default: mean causal context
    (seq_len + 1) / 2; pass ``context=seq_len`` for a token attending to a full window)."""
    counts = count_params(cfg) if counts is None else counts
    return 2 * counts.active_matmul_params + attention_flops_per_token(cfg, seq_len, context)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2,
                             n_kv_heads: Optional[int] = None) -> int:
    """2 (k, v) * n_layers * n_kv_heads * head_dim * bytes_per_element; ``n_kv_heads``
    defaults to the config's (pass ``cfg.n_heads`` for the multi-head equivalent)."""
    kv = cfg.n_kv_heads if n_kv_heads is None else n_kv_heads
    return 2 * cfg.n_layers * kv * cfg.head_size * bytes_per_element


def account(cfg: ModelConfig, seq_len: Optional[int] = None, bytes_per_element: int = 2,
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
# Per-GPU layout: pipeline stages x tensor / expert sharding x data replicas


ADAM_BYTES_PER_PARAM = 12  # fp32 master weights 4 + exp_avg 4 + exp_avg_sq 4


@dataclass(frozen=True)
class LayoutAccounting:
    """Per-GPU and per-node numbers of one parallel layout (see the module docstring)."""
    tp: int
    pp: int
    dp: int
    ep: int
    world_size: int
    gpus_per_node: int
    n_nodes: int
    zero1: bool
    pp_schedule: str
    stage_layers: tuple  # per pp rank: the global layer indices it holds
    valid: bool  # ParallelDims.validate accepts the layout (model and batch)
    warnings: tuple  # why not, and which uneven splits the counts assume
    # The most loaded GPU (most parameters; ties: lowest rank).
    rank: int
    rank_coords: dict  # {"pp": .., "dp": .., "ep": .., "tp": ..}
    rank_layers: tuple
    rank_has_embedding: bool
    rank_has_head: bool  # final norm + output head
    params_per_gpu: int
    params_per_gpu_by_category: dict
    expert_params_per_gpu: int  # the ep-sharded part (ZeRO-1 shards it over dp only)
    params_per_gpu_min: int
    params_per_gpu_mean: float  # over all ranks
    params_per_gpu_by_stage: tuple  # per pp rank, its most loaded (tp, ep) rank
    weight_bytes: int
    grad_bytes: int
    weight_bytes_per_gpu: int
    grad_bytes_per_gpu: int
    optimizer_bytes_per_gpu: int  # with parallel.zero1 as configured
    optimizer_bytes_per_gpu_no_zero1: int
    optimizer_bytes_per_gpu_zero1: int
    train_state_bytes_per_gpu: int  # weights + gradients + optimizer (as configured)
    kv_bytes_per_element: int
    kv_cache_bytes_per_token_per_gpu: int
    kv_replicated_over_tp: bool  # MQA: every tp rank holds the one K/V head
    # The most loaded node (gpus_per_node consecutive ranks; distinct parameters).
    node: int
    node_ranks: tuple  # (first, last)
    node_pp_stages: tuple
    params_per_node: int
    params_per_node_min: int

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stage_layers"] = [list(x) for x in self.stage_layers]
        d["rank_layers"] = list(self.rank_layers)
        d["warnings"] = list(self.warnings)
        for k in ("params_per_gpu_by_stage", "node_ranks", "node_pp_stages"):
            d[k] = list(d[k])
        return d


@dataclass(frozen=True)
class _Rule:
    """How a parameter is split: tp over ``tp_dim`` in whole ``tp_unit`` rows (a head), ep over
    ``ep_dim`` (whole experts). None: replicated over that mesh dimension."""
    tp_dim: Optional[int] = None
    tp_unit: int = 1
    ep_dim: Optional[int] = None


def _n_stages(p: ParallelConfig) -> int:
    interleaved = p.pp_schedule == "interleaved_1f1b" and p.pp > 1
    return p.pp * (p.pp_stages_per_rank if interleaved else 1)


def stage_layers(m: ModelConfig, p: ParallelConfig) -> list[tuple[int, ...]]:
    """Global layer indices held by each pp rank (see the module docstring for the rule)."""
    n_stages = _n_stages(p)
    if p.pp_layers is not None:
        sizes = list(p.pp_layers)
        if len(sizes) != n_stages or sum(sizes) != m.n_layers:
            raise ConfigError(f"parallel.pp_layers={p.pp_layers} must list {n_stages} stage "
                              f"sizes summing to model.n_layers={m.n_layers}")
    else:
        if m.n_layers < n_stages:
            raise ConfigError(f"model.n_layers={m.n_layers} is fewer than the {n_stages} "
                              f"pipeline stages of parallel.pp={p.pp}")
        from moe.parallel.pipeline import split_layers  # one rule for trainer and accounting

        sizes = [len(s) for s in split_layers(m.n_layers, n_stages)]
    per_rank: list[list[int]] = [[] for _ in range(p.pp)]
    start = 0
    for s, n in enumerate(sizes):
        per_rank[s % p.pp].extend(range(start, start + n))
        start += n
    return [tuple(x) for x in per_rank]


def _shard_rule(name: str, m: ModelConfig, tp: int) -> _Rule:
    """The trainer's split of parameter ``name`` (moe/parallel/tensor.py, expert.py)."""
    cat, parts = classify_param(name), name.split(".")
    hd = m.head_size
    if cat == "attention":
        w = parts[3]
        if w == "wq":
            return _Rule(tp_dim=0, tp_unit=hd)
        if w == "wo":
            return _Rule(tp_dim=1, tp_unit=hd)
        if w in ("wk", "wv"):  # split by KV head, or replicated (multi-query)
            return _Rule(tp_dim=0, tp_unit=hd) if m.n_kv_heads % tp == 0 else _Rule()
    elif cat == "expert":
        w = parts[4]
        if w in ("w1", "w3"):
            return _Rule(tp_dim=2, ep_dim=0)
        if w == "w2":
            return _Rule(tp_dim=1, ep_dim=0)
    elif cat == "dense_ffn":
        w = parts[3]
        if w in ("w1", "w3"):
            return _Rule(tp_dim=0)
        if w == "w2":
            return _Rule(tp_dim=1)
    else:  # router, norms, embeddings, output head: replicated
        return _Rule()
    raise ValueError(f"layout accounting does not know how {name!r} is sharded: "
                     f"update moe/accounting.py")


def _chunk(n: int, size: int, idx: int, unit: int) -> int:
    """Length of chunk ``idx`` of ``n`` split over ``size`` ranks in whole ``unit`` s; an
    uneven split puts the extra units on the first ranks."""
    base, rem = divmod(n // unit, size)
    return (base + (idx < rem)) * unit


def _local_numel(shape: tuple, rule: _Rule, tp: int, ep: int, tp_i: int, ep_i: int) -> int:
    n = math.prod(shape)
    if rule.tp_dim is not None:
        n = n // shape[rule.tp_dim] * _chunk(shape[rule.tp_dim], tp, tp_i, rule.tp_unit)
    if rule.ep_dim is not None:
        n = n // shape[rule.ep_dim] * _chunk(shape[rule.ep_dim], ep, ep_i, 1)
    return n


def _batch_neutral(cfg: Config, pp: int, data_shards: int) -> Config:
    """A copy of ``cfg`` whose batch settings fit any layout, so that ParallelDims.validate
    checks only the model against the sizes."""
    c = copy.deepcopy(cfg)
    g = c.model.capacity_group_seqs
    c.train.micro_batch_size = g
    c.train.batch_size = data_shards * g * pp
    c.train.batch_ramp_tokens = c.train.batch_ramp_start = 0
    c.parallel.pp_microbatches = pp if pp > 1 else None
    return c


def _layout_warnings(cfg: Config, dims) -> list[str]:
    m = cfg.model
    try:
        dims.validate(cfg, dims.world_size)
        return []
    except ConfigError as e:
        first = str(e)
    try:
        dims.validate(_batch_neutral(cfg, dims.pp, dims.data_shards), dims.world_size)
        return [f"batch settings do not fit the layout (the counts are unaffected): {first}"]
    except ConfigError as e:
        out = [f"the trainer would refuse this layout: {e}"]
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    uneven = []
    if m.n_heads % dims.tp:
        uneven.append(f"model.n_heads={m.n_heads} over tp={dims.tp}: "
                      f"{-(-m.n_heads // dims.tp)} query heads on the most loaded tp rank")
    if m.n_kv_heads % dims.tp and m.n_kv_heads != 1:
        uneven.append(f"model.n_kv_heads={m.n_kv_heads} over tp={dims.tp}: K/V counted as "
                      f"replicated on every tp rank")
    if n_moe and m.expert_hidden % dims.tp:
        uneven.append(f"model.expert_hidden={m.expert_hidden} over tp={dims.tp}: "
                      f"{-(-m.expert_hidden // dims.tp)} on the most loaded tp rank")
    if n_moe < m.n_layers and m.ffn_hidden % dims.tp:
        uneven.append(f"model.ffn_hidden={m.ffn_hidden} over tp={dims.tp}: "
                      f"{-(-m.ffn_hidden // dims.tp)} on the most loaded tp rank")
    if m.n_experts % dims.ep:
        uneven.append(f"model.n_experts={m.n_experts} over ep={dims.ep}: "
                      f"{-(-m.n_experts // dims.ep)} experts on the most loaded ep rank")
    out += [f"counted as an uneven split: {u}" for u in uneven]
    return out


def _layout_groups(cfg: Config) -> tuple[list[tuple[int, ...]], list[dict]]:
    """(layers per pp rank, per pp rank {(category, shape, rule): how many such parameters})."""
    from moe.model.transformer import Transformer

    m, p = cfg.model, cfg.parallel
    if p.pp > 1 and m.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true is not supported with parallel.pp > 1 "
                          "(the embedding and the head live on different stages)")
    layers = stage_layers(m, p)  # raises on an impossible split
    owner = {i: s for s, ls in enumerate(layers) for i in ls}
    groups: list[dict] = [{} for _ in range(p.pp)]
    with torch.device("meta"):
        model = Transformer(m)
    for name, prm in model.named_parameters():
        top = name.split(".")[0]
        stage = (owner[int(name.split(".")[1])] if top == "layers"
                 else 0 if top == "tok_embeddings" else p.pp - 1)  # norm, output: last stage
        key = (classify_param(name), tuple(prm.shape), _shard_rule(name, m, p.tp))
        groups[stage][key] = groups[stage].get(key, 0) + 1
    return layers, groups


def _rank_counts(groups: list[dict], p: ParallelConfig) -> dict:
    out = {}
    for s in range(p.pp):
        for e in range(p.ep):
            for t in range(p.tp):
                by_cat = dict.fromkeys(_CATEGORIES, 0)
                for (cat, shape, rule), mult in groups[s].items():
                    by_cat[cat] += mult * _local_numel(shape, rule, p.tp, p.ep, t, e)
                out[(s, e, t)] = by_cat
    return out


def params_per_rank(cfg: Config) -> dict:
    """{(pp_rank, ep_rank, tp_rank): {category: parameters held}} for ``cfg.parallel``'s
    layout (dp ranks are copies). Keys in global-rank order."""
    layers, groups = _layout_groups(cfg)
    return _rank_counts(groups, cfg.parallel)


def layout_accounting(cfg: Config, gpus_per_node: int = 8, weight_bytes: int = 2,
                      grad_bytes: int = 2, kv_bytes_per_element: int = 2,
                      strict: bool = False) -> LayoutAccounting:
    """Per-GPU / per-node parameters and memory of ``cfg.parallel``'s layout (module doc).

    ``strict``: raise ConfigError when ParallelDims.validate refuses the layout, instead of
    counting it (uneven splits) and listing the reasons in ``warnings``."""
    from moe.parallel.mesh import ParallelDims

    if gpus_per_node <= 0:
        raise ConfigError(f"gpus_per_node={gpus_per_node} must be > 0")
    m, p = cfg.model, cfg.parallel
    dims = ParallelDims.from_config(cfg)
    tp, pp, dp, ep = dims.tp, dims.pp, dims.dp, dims.ep
    layers, groups = _layout_groups(cfg)
    warnings = _layout_warnings(cfg, dims)
    if strict and warnings:
        raise ConfigError(warnings[0])

    counts = _rank_counts(groups, p)
    coords = list(counts)  # global-rank order
    totals = {c: sum(v.values()) for c, v in counts.items()}
    best = coords[max(range(len(coords)), key=lambda i: (totals[coords[i]], -i))]
    s0, e0, t0 = best
    rank = ((s0 * dp + 0) * ep + e0) * tp + t0
    n = totals[best]
    by_cat = counts[best]
    expert = by_cat["expert"]  # the only ep-sharded category
    dense = n - expert
    opt_zero1 = ADAM_BYTES_PER_PARAM * (-(-dense // (dp * ep)) + -(-expert // dp))
    opt_full = ADAM_BYTES_PER_PARAM * n
    opt = opt_zero1 if p.zero1 else opt_full
    kv_local = m.n_kv_heads // tp if m.n_kv_heads % tp == 0 else m.n_kv_heads
    kv = 2 * len(layers[s0]) * kv_local * m.head_size * kv_bytes_per_element

    # Nodes: distinct parameter elements over gpus_per_node consecutive ranks.
    world = dims.world_size
    n_nodes = -(-world // gpus_per_node)
    memo: dict = {}

    def node_count(members: frozenset) -> int:
        if members not in memo:
            total = 0
            for s in {c[0] for c in members}:
                here = [(e, t) for (s2, e, t) in members if s2 == s]
                for (cat, shape, rule), mult in groups[s].items():
                    held = {(t if rule.tp_dim is not None else 0,
                             e if rule.ep_dim is not None else 0) for e, t in here}
                    total += mult * sum(_local_numel(shape, rule, tp, ep, t, e) for e, t in held)
            memo[members] = total
        return memo[members]

    def coord_of(r: int) -> tuple[int, int, int]:
        return (r // (tp * ep * dp), (r // tp) % ep, r % tp)

    node_totals = []
    for k in range(n_nodes):
        members = frozenset(coord_of(r) for r in range(k * gpus_per_node,
                                                       min(world, (k + 1) * gpus_per_node)))
        node_totals.append(node_count(members))
    node = max(range(n_nodes), key=lambda k: (node_totals[k], -k))
    first, last = node * gpus_per_node, min(world, (node + 1) * gpus_per_node) - 1

    return LayoutAccounting(
        tp=tp, pp=pp, dp=dp, ep=ep, world_size=world, gpus_per_node=gpus_per_node,
        n_nodes=n_nodes, zero1=p.zero1, pp_schedule=p.pp_schedule,
        stage_layers=tuple(layers), valid=not warnings, warnings=tuple(warnings),
        rank=rank, rank_coords={"pp": s0, "dp": 0, "ep": e0, "tp": t0},
        rank_layers=layers[s0], rank_has_embedding=s0 == 0, rank_has_head=s0 == pp - 1,
        params_per_gpu=n, params_per_gpu_by_category=by_cat, expert_params_per_gpu=expert,
        params_per_gpu_min=min(totals.values()),
        params_per_gpu_mean=sum(totals.values()) / len(coords),
        params_per_gpu_by_stage=tuple(max(totals[(s, e, t)] for e in range(ep)
                                          for t in range(tp)) for s in range(pp)),
        weight_bytes=weight_bytes, grad_bytes=grad_bytes,
        weight_bytes_per_gpu=weight_bytes * n, grad_bytes_per_gpu=grad_bytes * n,
        optimizer_bytes_per_gpu=opt, optimizer_bytes_per_gpu_no_zero1=opt_full,
        optimizer_bytes_per_gpu_zero1=opt_zero1,
        train_state_bytes_per_gpu=(weight_bytes + grad_bytes) * n + opt,
        kv_bytes_per_element=kv_bytes_per_element, kv_cache_bytes_per_token_per_gpu=kv,
        kv_replicated_over_tp=tp > 1 and m.n_kv_heads % tp != 0,
        node=node, node_ranks=(first, last),
        node_pp_stages=tuple(sorted({coord_of(r)[0] for r in range(first, last + 1)})),
        params_per_node=node_totals[node], params_per_node_min=min(node_totals))


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
