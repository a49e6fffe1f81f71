"""Routers: which expert sees which token. One interface, one class per routing rule:

    TokenChoiceRouter   each token picks its top_k experts (softmax or sigmoid scores, optional
                        balancing bias); capacity planning drops assignments past capacity
    ExpertChoiceRouter  each expert takes its top-capacity tokens of each group (not causal)

A router's ``plan(x, n_groups, capacity, ...)`` returns a ``RoutingPlan``: the kept
assignments as flat, expert-sorted (token, weight) rows with per-expert counts, the logits
and probabilities, and its own balance losses. ``MoE`` (moe/model/moe.py) runs the experts on
the plan and never looks at how it was made, so a router that gives each token a variable
number of experts needs no change outside its own class. Each class declares ``causal`` (may
a token's routing depend on later tokens? generation and the inference engine ask
``check_causal``) and ``exportable`` (does Hugging Face Mixtral route this way?).

Everything here works on flat token tensors ``[T, ...]`` whose tokens are laid out as
``G`` capacity groups of ``n = T / G`` consecutive tokens. A capacity group is a fixed number of
whole sequences, so dropping decisions depend on the data only, never on how a batch is split
across devices or micro-batches.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from moe.config import ModelConfig


def expert_capacity(tokens_in_group: int, top_k: int, n_experts: int,
                    capacity_factor: float | None, min_capacity: int) -> int:
    """Slots per expert per group: ceil(cf * n * k / E), at least min_capacity.

    ``capacity_factor=None`` is dropless. An expert can receive a token at most once, so no
    capacity above ``tokens_in_group`` can ever bind: we cap there (dropless = that cap).
    """
    if capacity_factor is None:
        return tokens_in_group
    # The epsilon keeps float noise (1.1 * 100 / 10 = 11.000000000000002) from adding a slot.
    cap = max(min_capacity,
              math.ceil(capacity_factor * tokens_in_group * top_k / n_experts - 1e-9))
    return min(cap, tokens_in_group)


@dataclass
class RoutingPlan:
    """One forward's routing of T tokens to E experts (M kept assignments), all fp32 but the
    indices. Made by a router's ``plan``; ``MoE`` runs the experts on it."""

    logits: torch.Tensor  # [T, E] gate logits (the z-loss reads them)
    probs: torch.Tensor  # [T, E] score distribution over experts (losses, entropy)
    token: torch.Tensor  # [M] token id of each kept assignment, sorted by expert
    weight: torch.Tensor  # [M] its combine weight
    counts: torch.Tensor  # [E] kept assignments per expert (the expert kernels' group sizes)
    routed: torch.Tensor  # [E] assignments per expert before dropping
    aux_loss: torch.Tensor  # the router's balance loss (0 where it balances by construction)
    seq_aux_loss: torch.Tensor | None = None  # DeepSeek-V3's sequence-wise loss, when asked
    # [T, k] the experts each token chose, for routers where every token chooses k (the
    # decode path and the batch-dependence analysis read it); None otherwise.
    choices: torch.Tensor | None = None


class RouterBase(nn.Module):
    """What every router has: the gate (``gate``, an ``nn.Linear(dim, n_experts, bias=False)``,
    Mixtral's name: checkpoints and the parallel plan use it), scores in fp32 with the input
    jitter of training, and the declarations the entry points read."""

    causal: bool = True  # a token's routing never depends on later tokens
    exportable: bool = True  # Hugging Face Mixtral routes the same way
    name: str = ""  # its model.routing value
    not_causal_because: str = ""

    def __init__(self, dim: int, n_experts: int, jitter: float = 0.0, score: str = "softmax",
                 route_scale: float = 1.0, bias: bool = False):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score {score!r}: use softmax or sigmoid")
        self.n_experts = n_experts
        self.jitter = jitter
        self.score = score
        self.route_scale = route_scale
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # model.balance=bias: the balancing bias, a persistent buffer (see TokenChoiceRouter).
        if bias:
            self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        else:
            self.expert_bias = None

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RouterBase:
        """The router of ``cfg``'s MoE layers (``model.routing`` picks the class)."""
        return cls(cfg.d_model, cfg.n_experts, cfg.router_jitter, cfg.router_score,
                   cfg.route_scale)

    def scores(self, x: torch.Tensor):
        """x: [T, dim] -> logits, scores (softmax or sigmoid), probs (scores normalised over
        experts), all [T, E] fp32. Call with autocast off (``forward`` and ``plan`` do)."""
        x = x.float()
        if self.training and self.jitter > 0:
            # Multiplicative input jitter (Switch Transformer, sec. 2.4).
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.gate.weight.float())
        if self.score == "softmax":
            scores = probs = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        return logits, scores, probs

    def plan(self, x: torch.Tensor, n_groups: int, capacity: int,
             n_sequences: int | None = None) -> RoutingPlan:
        """Route x [T, dim] (``n_groups`` capacity groups, ``capacity`` slots per expert and
        group; ``n_sequences``: also the sequence-wise balance loss over that many)."""
        raise NotImplementedError

class TokenChoiceRouter(RouterBase):
    """Token choice: linear gate, scores, top-k, in fp32 even under autocast; then capacity
    planning (``plan_capacity``, ``drop_policy``) and the Switch/GShard balance loss.

    Scores (``score``): ``softmax`` over experts (Mixtral, GShard) or ``sigmoid`` per expert
    (DeepSeek-V3, sec. 2.1.2: s_{i,t} = sigmoid(u_t . e_i)). ``probs`` [T, E] is the score
    distribution over experts: the softmax itself, or the sigmoid scores normalised to sum 1
    over all experts (DeepSeek-V3's s' of eq. 19); the balance losses and the entropy read it.

    Combine weights (``weights``): ``"renorm"``: the chosen scores renormalised to sum 1 over
    the top-k (Mixtral; DeepSeek-V3 eq. 13, g = s / sum of the chosen s); ``"raw"``: the chosen
    scores as they are (Switch Transformer, top-1). Renormalising a single weight gives
    w / w = 1, whose gradient is zero: a renormalised top-1 gate learns from the router losses
    only. ``ModelConfig.router_weights_resolved`` picks one. Then times ``route_scale``
    (DeepSeek-V3's routed scaling factor, 2.5 in V3).

    ``expert_bias`` (``bias=True``, ``model.balance=bias``): DeepSeek-V3's auxiliary-loss-free
    balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE"; V3
    eq. 16): the top-k is taken over ``score + b``, the combine weights use the unbiased scores.
    A persistent fp32 buffer of shape [E] (checkpointed, replicated on every rank), moved by
    ``moe.model.balance.update_expert_biases`` after each optimizer step, never by gradients.
    """

    name = "token_choice"

    def __init__(self, dim: int, n_experts: int, top_k: int, jitter: float = 0.0,
                 weights: str = "renorm", score: str = "softmax", route_scale: float = 1.0,
                 bias: bool = False, drop_policy: str = "choice_major"):
        super().__init__(dim, n_experts, jitter, score, route_scale, bias)
        if weights not in ("renorm", "raw"):
            raise ValueError(f"router weights {weights!r}: use renorm or raw")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"unknown drop policy {drop_policy!r}: use one of "
                             f"{', '.join(DROP_POLICIES)}")
        self.top_k = top_k
        self.renorm = weights == "renorm"
        self.drop_policy = drop_policy

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> TokenChoiceRouter:
        return cls(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.router_jitter,
                   cfg.router_weights_resolved, cfg.router_score, cfg.route_scale,
                   bias=cfg.balance == "bias", drop_policy=cfg.drop_policy)

    def forward(self, x: torch.Tensor):
        """Selection: x [T, dim] -> logits [T, E], probs [T, E], weights [T, k] (all fp32),
        experts [T, k].

        Autocast is switched off: inside ``torch.autocast`` an ``F.linear`` of fp32 tensors still
        runs in bf16, and bf16 logits change routing decisions, the z-loss and the aux loss.
        """
        with _no_autocast(x):
            logits, scores, probs = self.scores(x)
            if self.expert_bias is None:
                weights, experts = scores.topk(self.top_k, dim=-1)
            else:  # the bias chooses, the unbiased score weighs (DeepSeek-V3 eq. 16)
                experts = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices
                weights = scores.gather(1, experts)
            if self.renorm:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if self.route_scale != 1.0:
                weights = weights * self.route_scale
        return logits, probs, weights, experts

    def plan(self, x: torch.Tensor, n_groups: int, capacity: int,
             n_sequences: int | None = None) -> RoutingPlan:
        """Select, keep the first ``capacity`` of each expert's queue per group, and sort the
        kept assignments by expert (stable: group and token order kept inside)."""
        logits, probs, weights, experts = self(x)
        t, k = experts.shape
        keep, _ = plan_capacity(weights, experts, n_groups, self.n_experts, capacity,
                                self.drop_policy)
        # One stable sort with dropped assignments keyed past the last expert puts the M kept
        # ones first, in the order nonzero + stable sort by expert would give.
        flat_experts = experts.reshape(-1)  # [T * k]; assignment i is token i // k
        keyed = flat_experts.masked_fill(~keep.reshape(-1), self.n_experts)
        counts = torch.bincount(keyed, minlength=self.n_experts + 1)  # [E + 1]: last = dropped
        n_kept = t * k - int(counts[-1])  # host sync, as nonzero would
        kept = torch.sort(keyed, stable=True).indices[:n_kept]  # [M] assignment ids
        # Per sequence (DeepSeek-V3 eq. 17): groups of one sequence whatever the capacity group.
        seq = sequence_balance_loss(probs, experts, n_sequences) if n_sequences else None
        return RoutingPlan(logits=logits, probs=probs, token=kept // k,
                           weight=weights.reshape(-1).index_select(0, kept),
                           counts=counts[:-1],
                           routed=torch.bincount(flat_experts, minlength=self.n_experts),
                           aux_loss=load_balancing_loss(probs, experts, n_groups),
                           seq_aux_loss=seq, choices=experts)


Router = TokenChoiceRouter  # the default rule's class under its short name


class ExpertChoiceRouter(RouterBase):
    """Expert choice (``expert_choice_plan``): every expert takes its ``capacity`` best tokens
    of each group; nothing is dropped, an expert is never over capacity, and a token may get
    any number of experts (none included). Combine weights: the chosen scores times
    route_scale (no renormalisation: a token's experts are not a fixed k). No balance loss
    applies (balanced by construction); ``model.balance`` must be none."""

    name = "expert_choice"
    causal = False
    exportable = False
    not_causal_because = "an expert's choice of a token depends on later tokens"

    def plan(self, x: torch.Tensor, n_groups: int, capacity: int,
             n_sequences: int | None = None) -> RoutingPlan:
        with _no_autocast(x):
            logits, scores, probs = self.scores(x)
            token, weight, counts = expert_choice_plan(scores, n_groups, capacity)
            if self.route_scale != 1.0:
                weight = weight * self.route_scale
        return RoutingPlan(logits=logits, probs=probs, token=token, weight=weight,
                           counts=counts, routed=counts,
                           aux_loss=torch.zeros((), device=x.device))


ROUTERS = {cls.name: cls for cls in (TokenChoiceRouter, ExpertChoiceRouter)}


def check_causal(model: nn.Module, what: str) -> None:
    """ValueError when a router of ``model`` is not causal: ``what`` (generation, the
    inference engine, ...) needs every token's routing to depend on it and earlier tokens
    only. The one rule every entry point asks."""
    for router in (m for m in model.modules() if isinstance(m, RouterBase)):
        if not router.causal:
            raise ValueError(f"model.routing={router.name} is not causal "
                             f"({router.not_causal_because}): {what} needs a causal model")


def _no_autocast(x: torch.Tensor):
    """Autocast off for the router's fp32 math. Entered only when autocast is on: the context
    costs ~10 us, a third of a batch-1 decode step's routing. (meta, for shape inference, has
    no autocast to switch off.)"""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return contextlib.nullcontext()


def expert_choice_plan(scores: torch.Tensor, n_groups: int, capacity: int):
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
    sec. 3.1): within each capacity group of n tokens, every expert takes the ``capacity``
    tokens with the highest scores for it: I = TopK(S^T, C) per group, G = the chosen scores.

    scores: [T, E] fp32 (the router's softmax or sigmoid scores), T = n_groups * n tokens.
    Returns the assignments sorted by expert (group, then score rank inside an expert):
    token [M] (token ids), weight [M] (its score, the combine weight) and counts [E]
    (= n_groups * capacity for every expert: each is exactly full), M = E * n_groups * capacity.
    A token may be taken by several experts or by none (it then keeps only the residual path).
    Not causal: a token's experts depend on the later tokens of its group.
    """
    t, n_experts = scores.shape
    n = t // n_groups
    vals, idx = scores.view(n_groups, n, n_experts).topk(capacity, dim=1)  # [G, C, E]
    base = (torch.arange(n_groups, device=scores.device) * n).view(n_groups, 1, 1)
    token = (idx + base).permute(2, 0, 1).reshape(-1)  # [E * G * C], expert-major
    weight = vals.permute(2, 0, 1).reshape(-1)
    counts = torch.full((n_experts,), n_groups * capacity, dtype=torch.long,
                        device=scores.device)
    return token, weight, counts


DROP_POLICIES = ("choice_major", "token_major", "probs")


def plan_capacity(weights: torch.Tensor, experts: torch.Tensor, n_groups: int, n_experts: int,
                  capacity: int, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide which (token, expert) assignments keep a slot.

    weights, experts: [T, k]. Within each group every expert has a queue of the assignments
    routed to it; the first ``capacity`` of the queue keep their slot, the rest are dropped.
    Queue order (token t's j-th choice is (t, j); n tokens per group):

    - ``choice_major``: (0, 0), (1, 0), ..., (n-1, 0), (0, 1), (1, 1), ...: every first choice
      before any second choice (GShard's and Switch's order). Not causal even with one-sequence
      groups: a later token's first choice can take the slot of an earlier token's second one.
    - ``token_major``: (0, 0), (0, 1), ..., (1, 0), (1, 1), ...: token order, a token's choices
      together (Megatron-Core's "position"). Causal with one-sequence groups: a later token
      never evicts an earlier one.
    - ``probs``: higher combine weight first, ties in token_major order. Not causal.

    Returns keep [T, k] bool and rank [T, k] (the assignment's place in its expert's queue).
    Vectorised with two stable sorts; ``tests/test_routing.py`` checks it against a Python loop.
    """
    t, k = experts.shape
    n = t // n_groups
    a = n * k  # assignments per group
    e = experts.reshape(n_groups, a)  # assignment i of a group is token i // k, slot i % k
    if policy == "probs":
        prio = torch.sort(-weights.detach().reshape(n_groups, a), dim=1, stable=True).indices
    elif policy == "token_major":
        prio = torch.arange(a, device=e.device).expand(n_groups, a)
    elif policy == "choice_major":
        # prio[i] = the token-major index of the i-th assignment in choice-major order.
        prio = torch.arange(a, device=e.device).view(n, k).t().reshape(a).expand(n_groups, a)
    else:
        raise ValueError(f"unknown drop policy {policy!r}: use one of {', '.join(DROP_POLICIES)}")
    e_prio = e.gather(1, prio)
    order = torch.sort(e_prio, dim=1, stable=True).indices  # by expert, priority kept inside
    sorted_e = e_prio.gather(1, order)
    counts = _group_counts(e, n_experts)
    starts = counts.cumsum(1) - counts
    rank_sorted = torch.arange(a, device=e.device) - starts.gather(1, sorted_e)
    rank = torch.empty_like(rank_sorted).scatter_(1, prio.gather(1, order), rank_sorted)
    rank = rank.reshape(t, k)
    return rank < capacity, rank


def _group_counts(e: torch.Tensor, n_experts: int) -> torch.Tensor:
    """e: [G, a] expert ids -> [G, E] how many of each group's a ids name each expert (one
    bincount: faster on CPU than a scatter_add of ones, and exact)."""
    g = e.shape[0]
    offset = (torch.arange(g, device=e.device) * n_experts).unsqueeze(1)
    return torch.bincount((e + offset).reshape(-1), minlength=g * n_experts).view(g, n_experts)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss, per capacity group, averaged over groups.

    For a group of n tokens, top-k routing and E experts:
        f_e = (number of assignments routed to e, counted BEFORE dropping) / (n * k)
        P_e = (1/n) * sum_tokens probs[token, e]          (softmax probabilities, all experts)
        L_group = E * sum_e f_e * P_e
    L = mean over groups of L_group. Perfectly uniform routing gives exactly 1.0 whatever E and k
    (Switch eq. 4 with f normalised over the k choices; HF Mixtral's value is k times this).
    Defining it per group makes it independent of how groups are split across devices.
    probs: [T, E] fp32, experts: [T, k].
    """
    t, n_experts = probs.shape
    k = experts.shape[1]
    n = t // n_groups
    counts = _group_counts(experts.reshape(n_groups, n * k), n_experts).to(probs.dtype)
    f = counts / (n * k)
    p = probs.reshape(n_groups, n, n_experts).mean(1)
    return (n_experts * (f * p).sum(1)).mean()


def sequence_balance_loss(probs: torch.Tensor, experts: torch.Tensor,
                          n_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (sec. 2.1.2, eqs. 17-20), per
    sequence, averaged over the sequences:
        f_i = E / (k * S) * (tokens of the sequence whose top-k holds expert i)
        P_i = (1/S) * sum_t s'_{i,t},   s' = the scores normalised over experts (``probs``)
        L_seq = sum_i f_i * P_i
    ``load_balancing_loss`` with one group per sequence (uniform routing: 1.0). It depends on
    each sequence alone, so no batch split or layout changes it."""
    return load_balancing_loss(probs, experts, n_sequences)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@dataclass
class RoutingStats:
    """Per-layer statistics of one forward, as detached tensors (no host sync in forward)."""

    tokens_per_expert: torch.Tensor  # [E] assignments routed to each expert, before dropping
    kept_per_expert: torch.Tensor  # [E] after dropping
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    entropy: torch.Tensor  # mean over tokens of the entropy of ``probs`` (nats)
    n_tokens: int
    seq_aux_loss: torch.Tensor | None = None  # the sequence-wise balance loss (0 when off)

    def drop_frac(self) -> float:
        total = float(self.tokens_per_expert.sum())
        return 0.0 if total == 0 else 1.0 - float(self.kept_per_expert.sum()) / total

    def max_over_mean_load(self) -> float:
        load = self.tokens_per_expert.float()
        return float(load.max() / load.mean().clamp_min(1e-9))
