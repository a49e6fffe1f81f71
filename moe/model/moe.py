"""The MoE feed-forward: route, drop past capacity, run the experts, combine.

Data flow for x: [B, S, dim] with capacity groups of ``g`` sequences (G = B / g groups):

    router            -> weights, experts: [T, k]     (T = B * S tokens)
    plan_capacity     -> keep: [T, k]                   (per group, per expert queue)
    sort kept by expert -> x_sorted: [M, dim], counts: [E]  (M kept assignments)
    experts           -> y_sorted: [M, dim]
    combine           -> out[t] = sum_j keep[t, j] * weights[t, j] * y[t, j]

A dropped assignment contributes nothing: the token keeps its other expert(s) and the residual
path (the block adds ``out`` to its input). Weights are not renormalised after dropping.
The router and the combine run in fp32 whatever the autocast dtype of the experts.

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
from moe.model.init import Init, init_parameters, prefixed, trunc_normal
from moe.model.router import (Router, RoutingStats, expert_capacity, load_balancing_loss,
                              plan_capacity, router_z_loss)


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
        self.drop_policy = cfg.drop_policy
        self.group_seqs = cfg.capacity_group_seqs
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        # The router losses are averaged over MoE layers, so coefficients do not depend on depth.
        self.layer_weight = 1.0 / n_moe_layers
        # This micro-batch's share of the global batch (set by the trainer; 1/accumulation).
        self.loss_scale = 1.0
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.router_jitter,
                             cfg.router_weights_resolved)
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_hidden,
                                      cfg.activation, cfg.expert_impl)
        self.last_stats: RoutingStats | None = None

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        return {"router.gate.weight": trunc_normal(std),
                **prefixed("experts", self.experts.init_rules(std, out_std))}

    def init_weights(self, std: float, out_std: float, seed: int | None = None) -> None:
        """Initialise a standalone MoE layer (seed None: from torch's global RNG)."""
        init_parameters(self, self.init_rules(std, out_std), seed)

    def capacity(self, tokens_in_group: int) -> int:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens_in_group, self.top_k, self.n_experts, cf, self.min_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        if b % self.group_seqs:
            raise ValueError(f"batch of {b} sequences is not a whole number of capacity groups "
                             f"of {self.group_seqs} (model.capacity_group_seqs)")
        n_groups = b // self.group_seqs
        flat = x.reshape(-1, dim)  # [T, dim]
        t, k = flat.shape[0], self.top_k

        logits, probs, weights, experts = self.router(flat)
        capacity = self.capacity(t // n_groups)
        keep, _ = plan_capacity(weights, experts, n_groups, self.n_experts, capacity,
                                self.drop_policy)

        # Kept assignments, sorted by expert (stable: group and token order kept inside). One
        # stable sort with dropped assignments keyed past the last expert puts the M kept ones
        # first, in the order nonzero + stable sort by expert would give.
        flat_experts = experts.reshape(-1)  # [T * k]; assignment i is token i // k
        keyed = flat_experts.masked_fill(~keep.reshape(-1), self.n_experts)
        counts = torch.bincount(keyed, minlength=self.n_experts + 1)  # [E + 1]: last = dropped
        n_kept = t * k - int(counts[-1])  # host sync, as nonzero would
        counts = counts[:-1]
        kept = torch.sort(keyed, stable=True).indices[:n_kept]  # [M] assignment ids
        token = kept // k
        # index_select / index_add rather than x[idx] / index_copy + sum: their backwards are a
        # plain index_add / index_select (x[idx]'s is a slower accumulating index_put, and
        # index_copy's needs the [T * k, dim] gradient materialised).
        y = self.experts(flat.index_select(0, token), counts, capacity * n_groups)  # [M, dim]
        # Combine in fp32, as the router's weights are: under bf16 autocast y is bf16, and
        # rounding the weights to bf16 would cost the gate's gradient (dL/dw = <dL/dout, y>)
        # its precision and round each token's sum of k terms twice.
        y = y.float() * weights.reshape(-1).index_select(0, kept).unsqueeze(1)
        # out[t] = sum of its kept y rows; per token the terms are added in expert order, not
        # slot order (bitwise the same for top_k <= 2, float rounding beyond).
        out = y.new_zeros(t, dim).index_add(0, token, y)
        out = out.to(x.dtype)

        aux = load_balancing_loss(probs, experts, n_groups)
        z = router_z_loss(logits)
        with torch.no_grad():
            self.last_stats = RoutingStats(
                tokens_per_expert=torch.bincount(flat_experts, minlength=self.n_experts),
                kept_per_expert=counts,
                aux_loss=aux.detach(), z_loss=z.detach(),
                entropy=-(probs * probs.clamp_min(1e-20).log()).sum(-1).mean(),
                n_tokens=t)
        if self.training and torch.is_grad_enabled():
            router_loss = self.aux_loss_coef * aux + self.z_loss_coef * z
            if router_loss.requires_grad:
                out = inject_loss_grad(out, router_loss, self.layer_weight * self.loss_scale)
        return out.view(b, s, dim)

    def router_loss(self) -> torch.Tensor:
        """This layer's weighted contribution to the total loss, from the last forward."""
        st = self.last_stats
        return self.layer_weight * (self.aux_loss_coef * st.aux_loss + self.z_loss_coef * st.z_loss)
