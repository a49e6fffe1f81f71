"""Batch dependence: how a prompt's next-token distribution changes with its batch-mates.

With a finite capacity factor, whether a token keeps its expert slot depends on the other
tokens of its capacity group (``model.capacity_group_seqs`` whole sequences): the same prompt
can be answered differently depending on who else is in the batch (the public explanation of
GPT-4's non-determinism at temperature 0). For each (capacity factor, group size) we place the
prompt in a group with ``group_size - 1`` batch-mates drawn at random from val data (cut to the
prompt's length) at a random (or fixed) place in the group, ``trials + 1`` times, and compare
every ordered pair of draws (no draw is special, so one odd draw cannot pass for the norm):

    KL(draw i || draw j) of the next-token distribution at the prompt's last position (and its
    mean over every position), top-1 agreement, and whether the prompt's routing plan differs.

Why the zeros are exact. Only the capacity plan can couple sequences, but floating point can
too: a matmul over a different number of rows (other batch-mates, other tokens per expert) may
round differently, which would make even a dropless model look batch-dependent in the last bits.
So ``group_forward`` evaluates the group with batch-invariant numerics: the prompt is computed
on its own ([1, L] tensors, its own expert matmuls over its own kept assignments) and only the
capacity plan (``plan_capacity``) sees the whole group, exactly as ``MoE.forward`` plans it (a
capacity group is planned independently of every other group, so the other groups of a real
batch need not be run at all). The prompt's logits are then a deterministic function of its
tokens and its keep mask: identical masks give bit-identical logits, and KL is computed in
float64 as sum p (log p - log q), which is exactly 0.0 for identical inputs. When dropless every
assignment is kept, and in a group of one sequence the plan sees the prompt alone, so in both
cases the masks, the logits and the reported numbers are exactly zero (agreement exactly 1).
``tests/test_analysis.py`` checks ``group_forward`` against ``model(batch)`` (allclose).
"""

from __future__ import annotations

import math

import torch

from moe.model.moe import MoE
from moe.model.router import TokenChoiceRouter, expert_capacity, plan_capacity


def _combine(ff: MoE, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
             keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """MoE.forward after planning, for a given keep mask: flat [T, dim] -> [T, dim]."""
    t, k = experts.shape
    flat_experts = experts.reshape(-1)
    kept = keep.reshape(-1).nonzero().squeeze(1)
    kept = kept[torch.sort(flat_experts[kept], stable=True).indices]
    counts = torch.bincount(flat_experts[kept], minlength=ff.n_experts)
    y = ff.experts(flat[kept // k], counts, capacity)
    y = y * weights.reshape(-1)[kept].unsqueeze(1).to(y.dtype)
    out = y.new_zeros(t * k, flat.shape[1]).index_copy(0, kept, y).view(t, k, -1).sum(1)
    if ff.shared_experts is not None:  # model.n_shared_experts: always on, never dropped
        out = out + ff.shared_experts(flat)
    return out


@torch.no_grad()
def group_forward(model, prompt: torch.Tensor, mates: torch.Tensor, position: int,
                  capacity_factor: float | None, min_capacity: int | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits [L, vocab] of ``prompt`` [L] sharing one capacity group with ``mates`` [m, L],
    placed at ``position`` (0..m) in the group; eval-mode routing with ``capacity_factor``.

    Returns (logits, keep masks of the prompt's assignments per MoE layer, each [L, k]).
    Batch-invariant for the prompt: see the module docstring.
    """
    routers = [ff.router for ff in model.moe_layers()]
    if not routers or not all(isinstance(r, TokenChoiceRouter) for r in routers):
        raise ValueError("batch dependence is defined for token-choice routing with routed "
                         f"experts (model.routing={model.cfg.routing}, "
                         f"n_experts={model.cfg.n_experts})")
    L = prompt.shape[0]
    m = mates.shape[0]
    if not 0 <= position <= m:
        raise ValueError(f"position={position} must be in [0, {m}]")
    if mates.numel() and mates.shape[1] != L:
        raise ValueError(f"batch-mates have length {mates.shape[1]}, the prompt {L}")
    cos, sin = model.rope_cos[:L], model.rope_sin[:L]
    hp = model.tok_embeddings(prompt[None])  # [1, L, dim], always computed on its own
    hm = model.tok_embeddings(mates) if m else None  # [m, L, dim]
    keeps = []
    for blk in model.layers.values():
        hp = hp + blk.attention(blk.attention_norm(hp), cos, sin)
        if m:
            hm = hm + blk.attention(blk.attention_norm(hm), cos, sin)
        ff = blk.feed_forward
        if not isinstance(ff, MoE):
            hp = hp + ff(blk.ffn_norm(hp))
            if m:
                hm = hm + ff(blk.ffn_norm(hm))
            continue
        xp = blk.ffn_norm(hp).reshape(L, -1)
        _, _, wp, ep = ff.router(xp)
        if m:
            xm = blk.ffn_norm(hm).reshape(m * L, -1)
            _, _, wm, em = ff.router(xm)
            cut = position * L  # the group in batch order: mates[:position], prompt, the rest
            weights = torch.cat([wm[:cut], wp, wm[cut:]])
            experts = torch.cat([em[:cut], ep, em[cut:]])
        else:
            weights, experts = wp, ep
        cap = expert_capacity((m + 1) * L, ff.top_k, ff.n_experts, capacity_factor,
                              ff.min_capacity if min_capacity is None else min_capacity)
        keep, _ = plan_capacity(weights, experts, 1, ff.n_experts, cap, ff.router.drop_policy)
        kp = keep[position * L:(position + 1) * L]
        keeps.append(kp)
        hp = hp + _combine(ff, xp, wp, ep, kp, cap).view_as(hp).to(hp.dtype)
        if m:
            km = torch.cat([keep[:position * L], keep[(position + 1) * L:]])
            hm = hm + _combine(ff, xm, wm, em, km, cap).view_as(hm).to(hm.dtype)
    return model.output(model.norm(hp))[0], keeps


@torch.no_grad()
def batch_dependence(model, prompt: torch.Tensor, pool: torch.Tensor,
                     capacity_factors: list[float | None], group_sizes: list[int],
                     trials: int = 16, seed: int = 0, position: str = "random",
                     min_capacity: int | None = None) -> list[dict]:
    """One result per (capacity factor, group size); see the module docstring.

    prompt: [L] token ids; pool: [N, >= L] candidate batch-mates (val windows), cut to L.
    position: "random" (the prompt's place in its group is drawn per trial), "first", "last".
    The same draws are used for every capacity factor (common random numbers).
    """
    model.eval()
    ff = next(m for m in model.modules() if isinstance(m, MoE))  # capacities are per layer alike
    min_cap = ff.min_capacity if min_capacity is None else min_capacity
    L = prompt.shape[0]
    pool = pool[:, :L]
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    results = []
    for g in group_sizes:
        if g < 1:
            raise ValueError(f"group size {g} must be >= 1")
        if g - 1 > len(pool):
            raise ValueError(f"group size {g} needs {g - 1} batch-mates, the pool has "
                             f"{len(pool)}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + g)
        draws = []
        for _ in range(trials + 1):
            idx = torch.randperm(len(pool), generator=gen)[:g - 1]
            pos = {"first": 0, "last": g - 1}.get(position)
            if pos is None:
                pos = int(torch.randint(g, (1,), generator=gen))
            draws.append((idx, pos))
        for cf in capacity_factors:
            outs = [group_forward(model, prompt, pool[idx], pos, cf, min_capacity)
                    for idx, pos in draws]
            logits = [o[0] for o in outs]
            lp = torch.log_softmax(torch.stack(logits).double(), -1)  # [D, L, vocab]
            top1 = lp.argmax(-1)  # [D, L]
            plans = [torch.cat([k.reshape(-1) for k in keeps]) if keeps else None
                     for _, keeps in outs]
            kl_last, kl_all, top1_last, top1_all, same_plan, identical, dropped = \
                [], [], [], [], [], [], []
            for i in range(len(outs)):
                # KL(draw i || every draw) in float64: exactly 0 where the logits are identical
                kl = (lp[i].exp() * (lp[i] - lp)).sum(-1).clamp_min(0.0)  # [D, L]
                for j in range(len(outs)):
                    if j == i:
                        continue
                    kl_last.append(float(kl[j, -1]))
                    kl_all.append(float(kl[j].mean()))
                    agree = top1[i] == top1[j]
                    top1_last.append(float(agree[-1]))
                    top1_all.append(float(agree.double().mean()))
                    same_plan.append(float(plans[i] is None or torch.equal(plans[i], plans[j])))
                    identical.append(float(torch.equal(logits[i], logits[j])))
            for _, keeps in outs:
                k = torch.stack(keeps) if keeps else torch.ones(1, dtype=torch.bool)
                dropped.append(1.0 - float(k.double().mean()))
            results.append({
                "capacity_factor": cf, "group_size": g, "trials": trials, "prompt_tokens": L,
                # slots per expert in the group, and whether model.min_capacity set it
                "capacity": expert_capacity(g * L, ff.top_k, ff.n_experts, cf, min_cap),
                "capacity_is_minimum": cf is not None and expert_capacity(
                    g * L, ff.top_k, ff.n_experts, cf, 0) < min_cap <= g * L,
                "kl_mean": _mean(kl_last), "kl_max": max(kl_last), "kl_std": _std(kl_last),
                "kl_all_positions_mean": _mean(kl_all),
                "top1_agreement": _mean(top1_last),
                "top1_agreement_all_positions": _mean(top1_all),
                "same_routing_plan": _mean(same_plan),
                "bit_identical_logits": _mean(identical),
                "prompt_drop_frac": _mean(dropped)})
    return results


@torch.no_grad()
def served_batch_kl(model, prompts: torch.Tensor, pool: torch.Tensor, draws: int = 8,
                    seed: int = 0) -> float:
    """Batch dependence as the model serves a batch: each prompt [L] of ``prompts`` [P, L]
    shares one batch of ``model.cfg.capacity_group_seqs`` sequences (one capacity group) with
    batch-mates drawn from ``pool`` [N, >= L], at a random place, ``draws`` times; returns the
    mean over prompts, ordered pairs of draws and positions of KL(draw i || draw j) of the
    next-token distributions (nats, float64).

    Unlike ``batch_dependence`` this is the model's own batched forward in eval mode (the
    eval capacity factor), so floating-point differences between batches count too: dropless,
    the number is the float noise of batched inference; with a finite capacity, the drops add
    theirs. (The ``capacity_batch_dependence`` claim, moe/ablate/claims.py, compares the two.)
    """
    model.eval()
    g = model.cfg.capacity_group_seqs
    length = prompts.shape[1]
    if draws < 2 or len(pool) < g - 1:
        raise ValueError(f"need draws >= 2 (got {draws}) and {g - 1} batch-mates in the pool "
                         f"(got {len(pool)})")
    gen = torch.Generator().manual_seed(seed)
    kls = []
    for prompt in prompts:
        lps = []
        for _ in range(draws):
            mates = pool[torch.randperm(len(pool), generator=gen)[:g - 1], :length]
            pos = int(torch.randint(g, (1,), generator=gen))
            batch = torch.cat([mates[:pos], prompt[None], mates[pos:]])
            lps.append(torch.log_softmax(model(batch)[pos].double(), -1))  # [L, vocab]
        lp = torch.stack(lps)  # [D, L, vocab]
        for i in range(draws):  # the j == i term is exactly 0
            kl = (lp[i].exp() * (lp[i] - lp)).sum(-1).clamp_min(0.0)  # [D, L]
            kls.append(float(kl.sum()) / ((draws - 1) * length))
    return _mean(kls)


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def results_markdown(results: list[dict], title: str = "") -> str:
    lines = [f"# Batch dependence{': ' + title if title else ''}", "",
             "Over every ordered pair of draws (the prompt with different random batch-mates): "
             "KL(draw i || draw j) of the next-token distribution at the prompt's last position "
             "(mean, max), its mean over all positions, top-1 agreement at the last position, "
             "the share of pairs whose routing plans for the prompt are equal, and the share "
             "of the prompt's assignments dropped.", "",
             "| capacity factor | group size | capacity | KL mean | KL max | KL all pos | "
             "top-1 agree | same plan | prompt drop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cf = "dropless" if r["capacity_factor"] is None else r["capacity_factor"]
        cap = f"{r['capacity']}{' (min)' if r['capacity_is_minimum'] else ''}"
        lines.append(f"| {cf} | {r['group_size']} | {cap} | {r['kl_mean']:.3g} | "
                     f"{r['kl_max']:.3g} | "
                     f"{r['kl_all_positions_mean']:.3g} | {r['top1_agreement']:.3f} | "
                     f"{r['same_routing_plan']:.2f} | {r['prompt_drop_frac']:.3f} |")
    if any(r["capacity_is_minimum"] for r in results):
        lines += ["", "(min): the capacity factor asks for fewer slots than model.min_capacity, "
                  "so the minimum decides the drops and such factors give the same numbers; "
                  "--min-capacity 0 or a longer prompt shows the factor itself."]
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict], path) -> object:
    """KL and top-1 agreement vs capacity factor, one line per group size."""
    from moe.analysis.plots import lines_vs_x, x_order

    cfs = x_order(r["capacity_factor"] for r in results)
    series = {}
    for g in sorted({r["group_size"] for r in results}):
        by_cf = {r["capacity_factor"]: r for r in results if r["group_size"] == g}
        series[f"group of {g} seq"] = {
            "kl": [(by_cf[c]["kl_mean"], by_cf[c]["kl_std"]) if c in by_cf else None
                   for c in cfs],
            "kl_all": [(by_cf[c]["kl_all_positions_mean"], 0.0) if c in by_cf else None
                       for c in cfs],
            "top1": [(by_cf[c]["top1_agreement_all_positions"], 0.0) if c in by_cf else None
                     for c in cfs]}
    return lines_vs_x(cfs, series, path, x_key="capacity_factor",
                      xlabel="eval capacity factor", title="prompt's output vs its batch-mates",
                      panels=[("kl", "KL between draws, last position", True),
                              ("kl_all", "KL between draws, mean over positions", True),
                              ("top1", "top-1 agreement, all positions", False)])
