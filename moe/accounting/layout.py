"""Per-GPU layout accounting: what each rank of a parallel layout holds, counted without building.

``layout_accounting(cfg)`` (``scripts/count_params.py --parallel.tp=8 ...``). A rank's
parameters follow the trainer's sharding because they are read from the same sharding plan
(moe/parallel/plan.py) and the same pipeline split (``split_layers``)::

    pipeline  layers split over pp stages: parallel.pp_layers, else as even as possible with the
              remainder on the MIDDLE stages (120 layers / 16 stages: 7 x 4, 8 x 8, 7 x 4). With
              interleaved_1f1b there are pp * pp_stages_per_rank virtual stages and pp rank r
              holds virtual stages r, r + pp, ... . The first (virtual) stage also holds
              tok_embeddings, the last one the final norm and the output head.
    tp        attention.wq rows / wo columns: whole query heads, n_heads / tp per rank;
              wk / wv: split by KV head when n_kv_heads % tp == 0, else (multi-query,
              n_kv_heads = 1) REPLICATED on every tp rank; experts.w1/w3 dim 2 and w2 dim 1
              (each expert's hidden units), dense w1/w3 dim 0 and w2 dim 1; router, norms,
              tok_embeddings and output replicated.
    ep        experts.w1/w2/w3 dim 0: n_experts / ep experts per rank.
    dp        replicates everything (parallel.dp_shard: none, zero1), or shards every parameter
              over the data ranks that replicate it (fsdp): dense over dp * ep, experts over dp.

Ranks are numbered with the mesh order ("pp", "dp", "ep", "tp"), tp innermost:
``rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i``. The **most loaded GPU** is the rank
holding the most parameters (ties: the lowest rank); every per-GPU number is that rank's. A
**node** is ``gpus_per_node`` (8) consecutive ranks; ``params_per_node`` counts the parameters
the node's ranks hold, each element ONCE however many of its ranks hold a copy (tp-replicated
norms / router / MQA K/V / embeddings, dp replicas), for the most loaded node. With tp = 8 a
node is one tp group = one pipeline stage, so params_per_node is one stage's parameters.

Memory convention (mixed-precision AdamW, Megatron style): weights ``weight_bytes`` (2: bf16 /
fp16) per parameter; gradients ``grad_bytes`` per parameter (2: bf16, the default; 4 for fp32
gradient accumulation); optimizer state 12 bytes per parameter (fp32 master weights 4 +
exp_avg 4 + exp_avg_sq 4). Sharded over a parameter's data replicas, a rank holds
``params_per_gpu_sharded``: dense (non-expert) parameters over dp * ep ranks, expert parameters
over dp ranks (ceil). ``parallel.dp_shard=zero1`` shards the optimizer state that way;
``fsdp`` (FSDP2) weights, gradients and optimizer state. Activations and temporary buffers are
not counted (under fsdp: nor the one block whose weights are gathered while it runs). (This
repository's trainer keeps fp32 parameters under bf16 autocast: 4 + 4 grad + 8 Adam = the same
16 bytes per parameter without ZeRO.) KV cache per token per GPU: 2 * (layers
on the rank) * (KV heads on the rank) * head_dim * bytes; with multi-query attention the one
K/V head is replicated on every tp rank, so each tp rank holds the full KV of its layers.

A layout the trainer would refuse (``ParallelDims.validate``, e.g. n_heads not divisible by tp)
is still counted where that is meaningful, assuming an uneven split with the extra heads /
units / experts on the first ranks; the refusals are listed in ``warnings`` (``valid`` is then
False). Batch-size errors are reported separately (they do not affect the counts). A pipeline
split that cannot exist (pp_layers not matching, fewer layers than stages, tied embeddings with
pp > 1) raises ConfigError.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from moe.accounting.params import CATEGORIES, classify_param
from moe.config import Config, ConfigError, ModelConfig, ParallelConfig
from moe.parallel.mesh import ParallelDims
from moe.parallel.plan import Placement, placement

__all__ = ["LayoutAccounting", "layout_accounting", "params_per_rank", "stage_layers",
           "ADAM_BYTES_PER_PARAM"]

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
    dp_shard: str  # none | zero1 | fsdp
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
    expert_params_per_gpu: int  # the ep-sharded part (ZeRO-1 / FSDP shard it over dp only)
    params_per_gpu_sharded: int  # dense over dp * ep, experts over dp: zero1's / fsdp's share
    params_per_gpu_min: int
    params_per_gpu_mean: float  # over all ranks
    params_per_gpu_by_stage: tuple  # per pp rank, its most loaded (tp, ep) rank
    weight_bytes: int
    grad_bytes: int
    weight_bytes_per_gpu: int
    grad_bytes_per_gpu: int
    optimizer_bytes_per_gpu: int  # with parallel.dp_shard as configured
    optimizer_bytes_per_gpu_no_zero1: int
    optimizer_bytes_per_gpu_zero1: int  # also fsdp's
    train_state_bytes_per_gpu: int  # weights + gradients + optimizer (as configured)
    train_state_bytes_per_gpu_fsdp: int  # the same, all three sharded
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


def stage_layers(m: ModelConfig, p: ParallelConfig) -> list[tuple[int, ...]]:
    """Global layer indices held by each pp rank: the trainer's split (``split_layers``, which
    also refuses an impossible one) under the loop placement (``stage_indices``)."""
    from moe.parallel.pipeline import n_pipeline_stages, split_layers, stage_indices

    n_stages = n_pipeline_stages(p)
    split = split_layers(m.n_layers, n_stages, p.pp_layers)
    return [tuple(i for s in stage_indices(r, p.pp, n_stages) for i in split[s])
            for r in range(p.pp)]


def _chunk(n: int, size: int, idx: int, unit: int) -> int:
    """Length of chunk ``idx`` of ``n`` split over ``size`` ranks in whole ``unit`` s; an
    uneven split puts the extra units on the first ranks."""
    base, rem = divmod(n // unit, size)
    return (base + (idx < rem)) * unit


def _local_numel(shape: tuple, rule: Placement, tp: int, ep: int, tp_i: int, ep_i: int) -> int:
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
    ParallelDims.from_config(cfg).check_pipeline(cfg)  # raises on a split that cannot exist
    layers = stage_layers(m, p)
    owner = {i: s for s, ls in enumerate(layers) for i in ls}
    groups: list[dict] = [{} for _ in range(p.pp)]
    with torch.device("meta"):
        model = Transformer(m)
    for name, prm in model.named_parameters():
        top = name.split(".")[0]
        stage = (owner[int(name.split(".")[1])] if top == "layers"
                 else 0 if top == "tok_embeddings" else p.pp - 1)  # norm, output: last stage
        key = (classify_param(name), tuple(prm.shape), placement(name, m, p.tp))
        groups[stage][key] = groups[stage].get(key, 0) + 1
    return layers, groups


def _rank_counts(groups: list[dict], p: ParallelConfig) -> dict:
    out = {}
    for s in range(p.pp):
        for e in range(p.ep):
            for t in range(p.tp):
                by_cat = dict.fromkeys(CATEGORIES, 0)
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
    sharded = -(-dense // (dp * ep)) + -(-expert // dp)
    opt_zero1, opt_full = ADAM_BYTES_PER_PARAM * sharded, ADAM_BYTES_PER_PARAM * n
    opt = opt_full if p.dp_shard == "none" else opt_zero1
    held = sharded if p.dp_shard == "fsdp" else n  # weights and gradients
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
                for (_, shape, rule), mult in groups[s].items():
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
        n_nodes=n_nodes, dp_shard=p.dp_shard, pp_schedule=p.pp_schedule,
        stage_layers=tuple(layers), valid=not warnings, warnings=tuple(warnings),
        rank=rank, rank_coords={"pp": s0, "dp": 0, "ep": e0, "tp": t0},
        rank_layers=layers[s0], rank_has_embedding=s0 == 0, rank_has_head=s0 == pp - 1,
        params_per_gpu=n, params_per_gpu_by_category=by_cat, expert_params_per_gpu=expert,
        params_per_gpu_sharded=sharded,
        params_per_gpu_min=min(totals.values()),
        params_per_gpu_mean=sum(totals.values()) / len(coords),
        params_per_gpu_by_stage=tuple(max(totals[(s, e, t)] for e in range(ep)
                                          for t in range(tp)) for s in range(pp)),
        weight_bytes=weight_bytes, grad_bytes=grad_bytes,
        weight_bytes_per_gpu=weight_bytes * held, grad_bytes_per_gpu=grad_bytes * held,
        optimizer_bytes_per_gpu=opt, optimizer_bytes_per_gpu_no_zero1=opt_full,
        optimizer_bytes_per_gpu_zero1=opt_zero1,
        train_state_bytes_per_gpu=(weight_bytes + grad_bytes) * held + opt,
        train_state_bytes_per_gpu_fsdp=(weight_bytes + grad_bytes) * sharded + opt_zero1,
        kv_bytes_per_element=kv_bytes_per_element, kv_cache_bytes_per_token_per_gpu=kv,
        kv_replicated_over_tp=tp > 1 and m.n_kv_heads % tp != 0,
        node=node, node_ranks=(first, last),
        node_pp_stages=tuple(sorted({coord_of(r)[0] for r in range(first, last + 1)})),
        params_per_node=node_totals[node], params_per_node_min=min(node_totals))
