"""The sharding plan: how every parameter is split over tensor- and expert-parallel ranks, as data.

One table keyed by parameter name (``fnmatch`` patterns on the names ``named_parameters()``
gives; ``*`` matches a layer index), in the spirit of torchtitan's TP plans. Everything that
needs to know a parameter's layout reads it, never a second copy of the rules:

    tensor parallelism  (moe/parallel/tensor.py)   which dim to cut over tp, where f / g go
    expert parallelism  (moe/parallel/expert.py)   which dim to cut over ep
    materialisation, gradient reduction, grad norm, ZeRO-1, checkpoints: through the
                        ``ShardRecord`` each cut leaves, keyed by parameter name (shards.py)
    layout accounting   (moe/accounting/layout.py)   per-rank counts without building a model

    wq.weight        [H*D, dim]     tp dim 0, whole query heads
    wk/wv.weight     [Hkv*D, dim]   tp dim 0, whole KV heads when Hkv % tp == 0; otherwise
                                    (multi-query, Hkv = 1) replicated over tp with a PARTIAL
                                    gradient on each rank (its query heads' share), summed over
                                    tp by the gradient reduction
    wq.bias          [H*D]          as wq (model.qkv_bias); wk/wv.bias as wk/wv
    q_norm/k_norm    [D]            model.qk_norm=head: replicated, PARTIAL gradient over tp
                                    (each rank normalises only its own heads);
                                    qk_norm=projection ([H*D], [Hkv*D]) needs every head:
                                    refused at tp > 1 (ParallelDims.validate)
    wo.weight        [dim, H*D]     tp dim 1 (row-parallel), whole heads
    experts.w1/w3    [E, dim, hid]  ep dim 0 (whole experts), tp dim 2
    experts.w2       [E, hid, dim]  ep dim 0, tp dim 1
    dense w1/w3      [hid, dim]     tp dim 0;   dense w2 [dim, hid]: tp dim 1
    shared_experts.* as the dense FFN (hid = n_shared_experts * shared hidden)
    shared_expert_gate [1, dim]     replicated, outside the shared FFN's region (as the router)
    router, norms, embeddings, head: replicated
    vision_encoder.*, perceiver.*, cross_attn.*: replicated (vision runs: dp and ep only)

A parameter no pattern matches is an error ("add it to moe/parallel/plan.py"): a new module
(vision, shared experts) must say how it is laid out before any layout can run it.

``TP_REGIONS`` lists where Megatron's two operators go (module name patterns): ``f`` (identity
forward, all-reduce backward) on a region's input, ``g`` (all-reduce forward) on its output.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from moe.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """A declared split. ``tp_unit``: what may not be cut along ``tp_dim``: "row" (any row),
    "head" (whole attention heads), "kv_head" (whole KV heads; fewer KV heads than tp ranks
    means replicated with a partial gradient). ``tp_partial``: replicated, each tp rank
    computing part of the gradient (a weight applied to every head separately)."""

    tp_dim: int | None = None
    tp_unit: str = "row"
    ep_dim: int | None = None
    tp_partial: bool = False


REPLICATED = Rule()

PARAMETER_PLAN: tuple[tuple[str, Rule], ...] = (
    ("tok_embeddings.weight", REPLICATED),
    ("output.weight", REPLICATED),
    ("norm.weight", REPLICATED),
    ("layers.*.attention_norm.weight", REPLICATED),
    ("layers.*.ffn_norm.weight", REPLICATED),
    ("layers.*.attention.wq.weight", Rule(tp_dim=0, tp_unit="head")),
    ("layers.*.attention.wk.weight", Rule(tp_dim=0, tp_unit="kv_head")),
    ("layers.*.attention.wv.weight", Rule(tp_dim=0, tp_unit="kv_head")),
    ("layers.*.attention.wo.weight", Rule(tp_dim=1, tp_unit="head")),
    # model.qkv_bias: cut as the rows of their weights.
    ("layers.*.attention.wq.bias", Rule(tp_dim=0, tp_unit="head")),
    ("layers.*.attention.wk.bias", Rule(tp_dim=0, tp_unit="kv_head")),
    ("layers.*.attention.wv.bias", Rule(tp_dim=0, tp_unit="kv_head")),
    # model.qk_norm=head: one [head_dim] weight used by every head of the rank.
    ("layers.*.attention.q_norm.weight", Rule(tp_partial=True)),
    ("layers.*.attention.k_norm.weight", Rule(tp_partial=True)),
    ("layers.*.feed_forward.router.*", REPLICATED),
    ("layers.*.feed_forward.experts.w1", Rule(tp_dim=2, ep_dim=0)),
    ("layers.*.feed_forward.experts.w3", Rule(tp_dim=2, ep_dim=0)),
    ("layers.*.feed_forward.experts.w2", Rule(tp_dim=1, ep_dim=0)),
    ("layers.*.feed_forward.w1.weight", Rule(tp_dim=0)),
    ("layers.*.feed_forward.w3.weight", Rule(tp_dim=0)),
    ("layers.*.feed_forward.w2.weight", Rule(tp_dim=1)),
    # Shared experts (model.n_shared_experts): one FFN beside the routed experts, split like
    # the dense FFN. (The router's balancing bias, a buffer, is replicated: router.* above.)
    ("layers.*.feed_forward.shared_experts.w1.weight", Rule(tp_dim=0)),
    ("layers.*.feed_forward.shared_experts.w3.weight", Rule(tp_dim=0)),
    ("layers.*.feed_forward.shared_experts.w2.weight", Rule(tp_dim=1)),
    ("layers.*.feed_forward.shared_expert_gate.weight", REPLICATED),
    # The vision parts (vision.enabled, moe/vision/model.py): replicated, the only layout a
    # vision run has (it refuses tp and pp; under ep they sit beside the experts, summed over
    # every data rank like the text model's dense weights).
    ("vision_encoder.*", REPLICATED),
    ("perceiver.*", REPLICATED),
    ("cross_attn.*", REPLICATED),
)


@dataclass(frozen=True)
class Region:
    """Where f and g go. ``module_type``: the class name the module must have (a dense
    ``FeedForward`` is a region; an ``MoE`` at the same name is not: its experts are)."""

    pattern: str
    f_input: bool = False
    g_output: bool = False
    module_type: str | None = None

    def matches(self, name: str, module) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) and (
            self.module_type is None or type(module).__name__ == self.module_type)


TP_REGIONS: tuple[Region, ...] = (
    # The router stays outside f: its input and its use in the combine are identical on every
    # tp rank, so its gradient is complete on each (putting it behind f would count it tp times).
    Region("layers.*.attention", f_input=True),
    Region("layers.*.attention.wo", g_output=True),
    Region("layers.*.feed_forward.experts", f_input=True, g_output=True),
    Region("layers.*.feed_forward", f_input=True, g_output=True, module_type="FeedForward"),
    Region("layers.*.feed_forward.shared_experts", f_input=True, g_output=True,
           module_type="FeedForward"),
)


@dataclass(frozen=True)
class Placement:
    """A rule resolved for a model and a tp size: what the layout code acts on.

    ``tp_unit``: elements along ``tp_dim`` that stay together (a head: head_dim rows).
    ``tp_partial_grad``: replicated over tp, each rank computes part of the gradient."""

    tp_dim: int | None = None
    tp_unit: int = 1
    ep_dim: int | None = None
    tp_partial_grad: bool = False


def rule_for(name: str) -> Rule:
    """The declared rule of parameter ``name``; raises on a name the plan does not cover."""
    for pattern, rule in PARAMETER_PLAN:
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    raise KeyError(f"no sharding rule for parameter {name!r}: add it to moe/parallel/plan.py")


def placement(name: str, m: ModelConfig, tp: int) -> Placement:
    """How parameter ``name`` of a model ``m`` is laid out at tensor-parallel size ``tp``."""
    rule = rule_for(name)
    if rule.tp_partial:
        return Placement(ep_dim=rule.ep_dim, tp_partial_grad=tp > 1)
    if rule.tp_unit == "kv_head" and m.n_kv_heads % tp:
        # Fewer KV heads than tp ranks (ParallelDims.validate allows only Hkv == 1): every
        # rank needs the head, and only sees its own query heads' part of the gradient.
        return Placement(ep_dim=rule.ep_dim, tp_partial_grad=tp > 1)
    unit = m.head_size if rule.tp_unit in ("head", "kv_head") else 1
    return Placement(tp_dim=rule.tp_dim, tp_unit=unit, ep_dim=rule.ep_dim)


def tp_regions(name: str, module) -> Region | None:
    """The tensor-parallel region a module forms, if any (first match)."""
    for region in TP_REGIONS:
        if region.matches(name, module):
            return region
    return None
