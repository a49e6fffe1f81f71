"""The MoE feed-forward: route, drop past capacity, run the experts, combine.

Data flow for x: [B, S, dim] with capacity groups of ``g`` sequences (G = B / g groups):

    router.plan       -> RoutingPlan: token, weight [M], counts [E]   (T = B * S tokens, M
                         kept assignments sorted by expert; token choice: select top-k, then
                         keep each expert's queue up to capacity per group, moe/model/router.py)
    gather            -> x_sorted: [M, dim]
    experts           -> y_sorted: [M, dim]
    combine           -> out[t] = sum of weight * y over t's kept assignments

A dropped assignment contributes nothing: the token keeps its other expert(s) and the residual
path (the block adds ``out`` to its input). Weights are not renormalised after dropping.
The router and the combine run in fp32 whatever the autocast dtype of the experts.

Inference (moe/inference/) may override the capacity factor per call (``capacity_factor=None``:
dropless, whatever the config says; a number: that factor, each sequence its own capacity
group, so a request is planned as it would be alone) and ask for the few-token decode path
(``decode_path``): when a forward has at most ``n_experts`` assignments (batch-1 decode has
``top_k``), sorting, capacity planning and the grouped matmul cost far more than the
arithmetic, so each chosen expert is run on its few tokens by plain matmuls with views of its
weights. The sorted path above is its reference (tests/test_inference.py checks them equal).

The router losses do not travel with the output. Each layer injects their gradient into its
own graph in backward (Megatron-Core's MoEAuxLossAutoScaler), so a pipeline stage never has to
send a loss to another stage; their values are kept in ``last_stats`` for logging.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moe.config import ModelConfig
from moe.model.experts import GroupedExperts
from moe.model.init import ZEROS, Init, init_parameters, prefixed, trunc_normal
from moe.model.int8 import Int8Experts
from moe.model.layers import FeedForward, activate
from moe.model.router import (
    ROUTERS,
    RoutingPlan,
    RoutingStats,
    TokenChoiceRouter,
    expert_capacity,
    router_z_loss,
)


class _ConfiguredCapacity:
    """The default of every ``capacity_factor=`` argument: the layer's configured factor
    (``model.capacity_factor`` in training, ``model.eval_capacity_factor`` in eval), as
    opposed to None (dropless) or a number given for one call. A type of its own, so no value
    a caller passes can be mistaken for it."""

    def __repr__(self) -> str:
        return "CONFIGURED_CAPACITY"


CONFIGURED_CAPACITY = _ConfiguredCapacity()


class InjectLossGrad(torch.autograd.Function):
    """Identity on ``x``; in backward, gives ``loss`` the gradient ``scale``.

    Equivalent to adding ``scale * loss`` to whatever scalar is finally backpropagated.
    """

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return x

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def inject_loss_grad(x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``InjectLossGrad.apply``; under ``torch.compile`` run eagerly (a graph break, next to
    the layer's host sync): traced, the injected gradient was lost (the compiled router gate's
    gradient was off by ~100%, tests/test_model.py)."""
    if torch.compiler.is_compiling():
        return _eager_inject()(x, loss, scale)
    return InjectLossGrad.apply(x, loss, scale)


@functools.cache
def _eager_inject():
    # Built on first use: torch.compiler.disable imports torch._dynamo (~2 s a process).
    return torch.compiler.disable(InjectLossGrad.apply)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, n_moe_layers: int = 1):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor_resolved  # "train" resolved
        self.min_capacity = cfg.min_capacity
        self.group_seqs = cfg.capacity_group_seqs
        # The Switch/GShard loss is applied with model.balance=aux_loss only (logged always).
        self.aux_loss_coef = cfg.aux_loss_coef if cfg.balance == "aux_loss" else 0.0
        self.z_loss_coef = cfg.z_loss_coef
        # Routing research options (docs/moe.md): bias balancing (its update:
        # moe/model/balance.py), the sequence-wise balance loss, shared experts; the routing
        # rule itself is the router's class (moe/model/router.py ROUTERS).
        self.bias_update_rate = cfg.bias_update_rate
        self.seq_aux_loss_coef = cfg.seq_aux_loss_coef
        self.fold_combine = cfg.expert_hidden < cfg.d_model  # see _run_experts
        # The router losses are averaged over MoE layers, so coefficients do not depend on depth.
        self.layer_weight = 1.0 / n_moe_layers
        # This micro-batch's share of the global batch (set by the trainer; 1/accumulation).
        self.loss_scale = 1.0
        self.router = self.experts = None  # n_experts=0: shared experts only (a dense FFN)
        if cfg.n_experts:
            self.router = ROUTERS[cfg.routing].from_config(cfg)
            self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_hidden,
                                          cfg.activation, cfg.expert_impl)
        # DeepSeekMoE's always-on experts: one FFN of n_shared * hidden units (the same function
        # as n_shared separate ones), tensor-parallel like the dense FFN (moe/parallel/plan.py).
        self.shared_experts = (FeedForward(cfg.d_model, cfg.shared_hidden_total, cfg.activation)
                               if cfg.n_shared_experts else None)
        # Qwen2-MoE's gate on the shared experts: sigmoid(x . w) per token (model.
        # shared_expert_gate); replicated under tensor parallelism, outside the shared FFN's
        # region, as the router is.
        self.shared_expert_gate = (nn.Linear(cfg.d_model, 1, bias=False)
                                   if cfg.shared_expert_gate else None)
        self.last_stats: RoutingStats | None = None
        self.last_experts: torch.Tensor | None = None  # [T, k] experts chosen in the last forward

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        rules: dict[str, Init] = {}
        if self.router is not None:
            rules["router.gate.weight"] = trunc_normal(std)
            if self.router.expert_bias is not None:
                rules["router.expert_bias"] = ZEROS  # a buffer: balancing starts unbiased
            rules.update(prefixed("experts", self.experts.init_rules(std, out_std)))
        if self.shared_experts is not None:
            rules.update(prefixed("shared_experts", self.shared_experts.init_rules(std, out_std)))
        if self.shared_expert_gate is not None:
            rules["shared_expert_gate.weight"] = trunc_normal(std)
        return rules

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' output for x [..., dim], gated when the layer has a gate."""
        out = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def init_weights(self, std: float, out_std: float, seed: int | None = None) -> None:
        """Initialise a standalone MoE layer (seed None: from torch's global RNG)."""
        init_parameters(self, self.init_rules(std, out_std), seed)

    def capacity(self, tokens_in_group: int, capacity_factor=CONFIGURED_CAPACITY) -> int:
        cf = capacity_factor
        if cf is CONFIGURED_CAPACITY:
            cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens_in_group, self.top_k, self.n_experts, cf, self.min_capacity)

    def forward(self, x: torch.Tensor, capacity_factor=CONFIGURED_CAPACITY,
                decode_path: bool = False) -> torch.Tensor:
        """x: [B, S, dim] -> [B, S, dim].

        ``capacity_factor``: the config's (training or eval factor, groups of
        ``model.capacity_group_seqs`` sequences) by default; None is dropless, a number
        overrides it for this call with one group per sequence. ``decode_path``: take the few-token
        path when it applies (dropless, eval mode, at most ``n_experts`` assignments, plain
        ``GroupedExperts`` or ``Int8Experts`` with no parallel hooks); it keeps no
        ``last_stats`` (None), only ``last_experts``.
        """
        b, s, dim = x.shape
        dropless = capacity_factor is None or (capacity_factor is CONFIGURED_CAPACITY and (
            self.capacity_factor if self.training else self.eval_capacity_factor) is None)
        if self.router is None:  # no routed experts: the shared FFN alone
            return self._forward_shared_only(x)
        if decode_path and dropless and self._few_token_path_applies(b * s):
            flat = x.reshape(-1, dim)
            out = self._forward_few(flat)
            if self.shared_experts is not None:
                out = out + self._shared(flat)
            return out.view(b, s, dim)
        # A factor given for one call (inference: the engine, generate) plans each sequence as
        # its own group, so a request's tokens never depend on its batch-mates; the configured
        # factor plans groups of model.capacity_group_seqs sequences (training, evaluation).
        group = 1 if capacity_factor is not CONFIGURED_CAPACITY else self.group_seqs
        if b % group:
            raise ValueError(f"batch of {b} sequences is not a whole number of capacity groups "
                             f"of {group} (model.capacity_group_seqs)")
        n_groups = b // group
        flat = x.reshape(-1, dim)  # [T, dim]
        t = flat.shape[0]

        capacity = self.capacity(t // n_groups, capacity_factor)
        plan = self.router.plan(flat, n_groups, capacity,
                                n_sequences=b if self.seq_aux_loss_coef else None)
        self.last_experts = plan.choices
        # index_select / index_add rather than x[idx] / index_copy + sum: their backwards are a
        # plain index_add / index_select (x[idx]'s is a slower accumulating index_put, and
        # index_copy's needs the [T * k, dim] gradient materialised).
        y = self._run_experts(flat.index_select(0, plan.token), plan.counts,
                              capacity * n_groups, plan.weight)  # [M, dim] fp32
        # out[t] = sum of its kept y rows; per token the terms are added in expert order, not
        # slot order (bitwise the same for top_k <= 2, float rounding beyond).
        out = y.new_zeros(t, dim).index_add(0, plan.token, y).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self._shared(flat)
        return self._finish(out, plan).view(b, s, dim)

    def _run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor, capacity: int,
                     weight: torch.Tensor) -> torch.Tensor:
        """experts(x_sorted) times each row's combine weight [M], as fp32 [M, dim].

        Narrow experts in fp32 (``fold_combine``: expert_hidden < d_model): the weight is folded
        into the experts' hidden activation (moe/model/experts.py), so the scaling touches
        [M, hidden] rather than [M, dim]. Otherwise the combine is in fp32, as the router's
        weights are: under bf16 autocast y is bf16, and rounding the weights to bf16 would cost
        the gate's gradient (dL/dw = <dL/dout, y>) its precision and round each token's sum of
        k terms twice. (Decided by the config, not the local shard, so every layout computes
        the same expression.)"""
        if self.fold_combine and not torch.is_autocast_enabled(x_sorted.device.type):
            return self.experts(x_sorted, counts, capacity, scale=weight).float()
        return self.experts(x_sorted, counts, capacity).float() * weight.unsqueeze(1)

    def _finish(self, out: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Keep the statistics and inject the router losses' gradient; out: [T, dim]."""
        z, aux, seq, probs = router_z_loss(plan.logits), plan.aux_loss, plan.seq_aux_loss, \
            plan.probs
        with torch.no_grad():
            self.last_stats = RoutingStats(
                tokens_per_expert=plan.routed,
                kept_per_expert=plan.counts,
                aux_loss=aux.detach(), z_loss=z.detach(),
                entropy=-(probs * probs.clamp_min(1e-20).log()).sum(-1).mean(),
                n_tokens=out.shape[0],
                seq_aux_loss=(torch.zeros((), device=out.device) if seq is None
                              else seq.detach()))
        if self.training and torch.is_grad_enabled():
            router_loss = self.aux_loss_coef * aux + self.z_loss_coef * z
            if seq is not None:
                router_loss = router_loss + self.seq_aux_loss_coef * seq
            if router_loss.requires_grad:
                out = inject_loss_grad(out, router_loss, self.layer_weight * self.loss_scale)
        return out

    def _forward_shared_only(self, x: torch.Tensor) -> torch.Tensor:
        """n_experts=0: the shared experts are the whole layer (a dense FFN); empty stats."""
        b, s, dim = x.shape
        out = self._shared(x)
        zero = torch.zeros((), device=x.device)
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        self.last_experts = None
        self.last_stats = RoutingStats(tokens_per_expert=empty, kept_per_expert=empty,
                                       aux_loss=zero, z_loss=zero, entropy=zero, n_tokens=b * s,
                                       seq_aux_loss=zero)
        return out

    def _few_token_path_applies(self, n_tokens: int) -> bool:
        e = self.experts
        return (not self.training and isinstance(self.router, TokenChoiceRouter)
                and n_tokens * self.top_k <= self.n_experts
                and type(e) in (GroupedExperts, Int8Experts) and not e._forward_hooks
                and not e._forward_pre_hooks)

    def _forward_few(self, flat: torch.Tensor) -> torch.Tensor:
        """The decode path: flat [T, dim] -> [T, dim], dropless, T * top_k <= n_experts.

        Each chosen expert runs on its tokens as three matmuls with views of its weights
        (``experts.expert``; int8 weights: moe/model/int8.py). gpt-fast gathers the chosen
        experts' weights instead: right on a GPU under torch.compile, but on a CPU the copy
        costs as much as the matmul. Combined as the sorted path does: fp32, each token's
        terms added in expert order from zero.
        """
        if torch.compiler.is_compiling():
            return self._forward_few_gathered(flat)
        _, _, weights, experts = self.router(flat)
        self.last_experts, self.last_stats = experts, None
        expert = self.experts.expert  # fp32 / bf16 views, or int8 (moe/model/int8.py)
        t = flat.shape[0]
        if t == 1:  # batch-1 decode: no index tensors at all
            ids = experts[0].tolist()
            out = None
            for j in sorted(range(len(ids)), key=ids.__getitem__):
                y = expert(ids[j], flat).float() * weights[:, j:j + 1]
                out = y if out is None else out + y
            return out.to(flat.dtype)
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for token, row in enumerate(experts.tolist()):  # T * k host ints (a sync on GPU)
            for j, e in enumerate(row):
                by_expert.setdefault(e, []).append((token, j))
        out = None
        for e in sorted(by_expert):
            pairs = by_expert[e]
            idx = torch.tensor([tok for tok, _ in pairs], device=flat.device)
            slot = torch.tensor([j for _, j in pairs], device=flat.device)
            xe, we = flat.index_select(0, idx), weights[idx, slot].unsqueeze(1)
            y = expert(e, xe).float() * we
            if out is None:
                out = y.new_zeros(t, flat.shape[1])
            out.index_add_(0, idx, y)
        return out.to(flat.dtype)

    def _forward_few_gathered(self, flat: torch.Tensor) -> torch.Tensor:
        """The decode path with no host sync, what ``torch.compile`` traces (the expert ids
        read to the host above are a graph break per layer): each token's top_k experts'
        weights are gathered, [T, k, dim, hidden], as gpt-fast's MoE, and combined in fp32 in
        the router's order (``_forward_few`` is its reference, equal to float rounding). The
        gather copies 3 * k expert matrices a token, which eager on a CPU does not pay for;
        compiled, it runs inside the generated kernels. Plain ``GroupedExperts`` only."""
        _, _, weights, experts = self.router(flat)  # weights, experts [T, k]
        self.last_experts, self.last_stats = experts, None
        e = self.experts
        h = torch.einsum("td,tkdh->tkh", flat, e.w1[experts])
        up = torch.einsum("td,tkdh->tkh", flat, e.w3[experts]) if e.w3 is not None else None
        y = torch.einsum("tkh,tkhd->tkd", activate(h, up), e.w2[experts])  # [T, k, dim]
        return (y.float() * weights.unsqueeze(-1)).sum(1).to(flat.dtype)

    def router_loss(self) -> torch.Tensor:
        """This layer's weighted contribution to the total loss, from the last forward."""
        st = self.last_stats
        seq = self.seq_aux_loss_coef * st.seq_aux_loss if st.seq_aux_loss is not None else 0.0
        return self.layer_weight * (self.aux_loss_coef * st.aux_loss + self.z_loss_coef * st.z_loss
                                    + seq)
