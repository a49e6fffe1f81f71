"""Router, capacity planning, router losses and the MoE layer's combine (moe/model/router.py,
moe/model/moe.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.model import MoE, build_model, expert_capacity, plan_capacity
from moe.model.router import DROP_POLICIES, Router, load_balancing_loss, router_z_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T_, F_ = True, False


# --- expert_capacity ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ((8, 2, 4, 1.25, 0), 5),     # ceil(1.25 * 8 * 2 / 4) = ceil(5.0) = 5
    ((8, 2, 4, 1.0, 0), 4),      # 8 * 2 / 4 = 4
    ((8, 2, 4, 1.1, 0), 5),      # ceil(4.4) = 5
    ((10, 2, 3, 1.0, 0), 7),     # ceil(20 / 3) = ceil(6.67) = 7
    ((8, 1, 16, 1.0, 2), 2),     # ceil(0.5) = 1, floored up to min_capacity 2
    ((8, 2, 16, 1.0, 4), 4),     # ceil(1.0) = 1 -> min_capacity 4
    ((8, 2, 4, 0.1, 0), 1),      # ceil(0.4) = 1: never zero slots when cf > 0
    ((8, 2, 2, 2.0, 0), 8),      # ceil(16) = 16 capped at tokens_in_group 8
    ((8, 2, 16, 1.0, 100), 8),   # min_capacity 100 capped at 8 as well
    ((8, 2, 4, None, 0), 8),     # dropless = tokens_in_group
    ((8, 2, 4, None, 100), 8),   # dropless ignores min_capacity
    ((1, 1, 4, 1.0, 0), 1),
])
def test_expert_capacity(args, expected):
    assert expert_capacity(*args) == expected


def test_expert_capacity_is_not_off_by_one_from_float_rounding():
    # ceil(1.1 * 100 * 1 / 10) = ceil(11) = 11 for the capacity_factor a user writes, 1.1.
    assert expert_capacity(100, 1, 10, 1.1, 0) == 11
    assert expert_capacity(100, 2, 4, 1.1, 0) == 55  # ceil(55.0)


def test_moe_capacity_uses_train_or_eval_factor():
    cfg = ModelConfig(d_model=32, n_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.0,
                      eval_capacity_factor=None, min_capacity=0)
    layer = MoE(cfg)
    assert layer.train().capacity(16) == 8  # 1.0 * 16 * 2 / 4
    assert layer.eval().capacity(16) == 16  # dropless in eval


def test_eval_capacity_factor_follows_training_by_default():
    # No eval key: eval uses the training factor (the old default, 2.0, would give 16 here).
    cfg = ModelConfig(d_model=32, n_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.0,
                      min_capacity=0)
    assert cfg.eval_capacity_factor == "train" and cfg.eval_capacity_factor_resolved == 1.0
    layer = MoE(cfg)
    assert layer.train().capacity(16) == layer.eval().capacity(16) == 8


def test_dropless_model_drops_nothing_in_eval():
    """capacity_factor null and no eval key: eval is dropless too, and (no jitter) equals the
    training-mode output. One repeated token sends all 16 tokens to the same 2 of 8 experts:
    any finite eval factor below 4 would drop (the old default 2.0 kept 8 of 16)."""
    cfg = ModelConfig(d_model=16, n_experts=8, top_k=2, expert_hidden=24, capacity_factor=None,
                      min_capacity=0, expert_impl="loop")
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(0.3, 0.3)
    x = torch.randn(1, 1, 16).expand(2, 8, 16).contiguous()
    with torch.no_grad():
        out_eval = layer.eval()(x)
        st = layer.last_stats
        assert st.kept_per_expert.tolist() == st.tokens_per_expert.tolist()
        assert int(st.tokens_per_expert.max()) == 16 and st.drop_frac() == 0.0
        out_train = layer.train()(x)
    assert torch.equal(out_eval, out_train)


# --- plan_capacity on hand-made routings -------------------------------------------------------

# Group A: 4 tokens, k=2, E=3. Assignment index a = 2 * token + slot (token-major).
#   token 0: experts (0, 1) weights (.6, .4)     a0: e0 .6   a1: e1 .4
#   token 1: experts (0, 2) weights (.7, .3)     a2: e0 .7   a3: e2 .3
#   token 2: experts (1, 0) weights (.55, .45)   a4: e1 .55  a5: e0 .45
#   token 3: experts (0, 1) weights (.7, .3)     a6: e0 .7   a7: e1 .3
EXPERTS_A = [[0, 1], [0, 2], [1, 0], [0, 1]]
WEIGHTS_A = [[.6, .4], [.7, .3], [.55, .45], [.7, .3]]
# Group B: 4 more tokens (a second capacity group; queues restart at zero).
#   token 4: (2, 0) (.8, .2)    b0: e2 .8   b1: e0 .2
#   token 5: (2, 1) (.5, .5)    b2: e2 .5   b3: e1 .5
#   token 6: (2, 0) (.6, .4)    b4: e2 .6   b5: e0 .4
#   token 7: (1, 2) (.65, .35)  b6: e1 .65  b7: e2 .35
EXPERTS_B = [[2, 0], [2, 1], [2, 0], [1, 2]]
WEIGHTS_B = [[.8, .2], [.5, .5], [.6, .4], [.65, .35]]

# policy=token_major, capacity 2: each expert's queue in token order, a token's choices together
# (queue order a0, a1, a2, ..., a7).
#   A: e0 queue a0, a2, a5, a6 -> ranks 0, 1, 2, 3 (a5, a6 dropped)
#      e1 queue a1, a4, a7     -> ranks 0, 1, 2    (a7 dropped)
#      e2 queue a3             -> rank 0
#   so token 2 keeps only its e1 slot and token 3 loses both.
RANK_A_TOKEN = [[0, 0], [1, 0], [1, 2], [3, 2]]
KEEP_A_TOKEN = [[T_, T_], [T_, T_], [T_, F_], [F_, F_]]
#   B: e2 queue b0, b2, b4, b7 -> 0, 1, 2, 3;  e0 queue b1, b5 -> 0, 1;  e1 queue b3, b6 -> 0, 1
RANK_B_TOKEN = [[0, 0], [1, 0], [2, 1], [1, 3]]
KEEP_B_TOKEN = [[T_, T_], [T_, T_], [F_, T_], [T_, F_]]

# policy=choice_major, capacity 2: all first choices in token order, then all second choices
# (queue order a0, a2, a4, a6, a1, a3, a5, a7).
#   A: e0 queue a0, a2, a6, a5 -> ranks 0, 1, 2, 3 (token 3's first choice now queues ahead of
#                                  token 2's second choice)
#      e1 queue a4, a1, a7     -> ranks 0, 1, 2
#      e2 queue a3             -> rank 0
RANK_A_CHOICE = [[0, 1], [1, 0], [0, 3], [2, 2]]
KEEP_A_CHOICE = [[T_, T_], [T_, T_], [T_, F_], [F_, F_]]
#   B: e2 queue b0, b2, b4, b7 -> 0, 1, 2, 3;  e1 queue b6, b3 -> 0, 1;  e0 queue b1, b5 -> 0, 1
RANK_B_CHOICE = [[0, 0], [1, 1], [2, 1], [0, 3]]
KEEP_B_CHOICE = [[T_, T_], [T_, T_], [F_, T_], [T_, F_]]

# policy=probs, capacity 2: each queue by descending weight, ties by assignment index.
#   A: e0 holds a0 .6, a2 .7, a5 .45, a6 .7 -> a2 (.7, first), a6 (.7), a0 (.6), a5 (.45)
#        ranks a2=0, a6=1, a0=2, a5=3   (the tie a2/a6 goes to the earlier a2)
#      e1 holds a1 .4, a4 .55, a7 .3 -> a4=0, a1=1, a7=2
#      e2 holds a3 -> 0
RANK_A_PROBS = [[2, 1], [0, 0], [0, 3], [1, 2]]
KEEP_A_PROBS = [[F_, T_], [T_, T_], [T_, F_], [T_, F_]]
#   B: e2 holds b0 .8, b2 .5, b4 .6, b7 .35 -> b0=0, b4=1, b2=2, b7=3
#      e0 holds b1 .2, b5 .4 -> b5=0, b1=1;  e1 holds b3 .5, b6 .65 -> b6=0, b3=1
RANK_B_PROBS = [[0, 1], [2, 1], [1, 0], [0, 3]]
KEEP_B_PROBS = [[T_, T_], [F_, T_], [T_, T_], [T_, F_]]


def _plan(experts, weights, n_groups, policy, capacity=2, n_experts=3):
    return plan_capacity(torch.tensor(weights), torch.tensor(experts), n_groups, n_experts,
                         capacity, policy)


@pytest.mark.parametrize("policy, rank_a, keep_a", [
    ("token_major", RANK_A_TOKEN, KEEP_A_TOKEN),
    ("choice_major", RANK_A_CHOICE, KEEP_A_CHOICE),
    ("probs", RANK_A_PROBS, KEEP_A_PROBS),
])
def test_plan_capacity_one_group_by_hand(policy, rank_a, keep_a):
    keep, rank = _plan(EXPERTS_A, WEIGHTS_A, 1, policy)
    assert keep.dtype == torch.bool and keep.shape == (4, 2)
    assert rank.tolist() == rank_a
    assert keep.tolist() == keep_a


@pytest.mark.parametrize("policy, rank_ab, keep_ab", [
    ("token_major", RANK_A_TOKEN + RANK_B_TOKEN, KEEP_A_TOKEN + KEEP_B_TOKEN),
    ("choice_major", RANK_A_CHOICE + RANK_B_CHOICE, KEEP_A_CHOICE + KEEP_B_CHOICE),
    ("probs", RANK_A_PROBS + RANK_B_PROBS, KEEP_A_PROBS + KEEP_B_PROBS),
])
def test_plan_capacity_two_groups_by_hand(policy, rank_ab, keep_ab):
    keep, rank = _plan(EXPERTS_A + EXPERTS_B, WEIGHTS_A + WEIGHTS_B, 2, policy)
    assert rank.tolist() == rank_ab
    assert keep.tolist() == keep_ab
    # The same 8 tokens as ONE group queue together: group B's e0 assignments now wait behind
    # group A's four (token 4's e0 slot has rank 4 under token_major), so the groups matter.
    _, rank_one = _plan(EXPERTS_A + EXPERTS_B, WEIGHTS_A + WEIGHTS_B, 1, policy)
    assert rank_one.tolist() != rank_ab


def test_plan_capacity_orders_differ_by_hand():
    """Group A, capacity 3: e0's queue holds token 2's second choice (.45) and token 3's first
    choice (.7), and only one of them fits. token_major keeps the earlier token's (t2 keeps
    both experts, t3 loses its first choice); choice_major keeps the first choice."""
    keep_token, _ = _plan(EXPERTS_A, WEIGHTS_A, 1, "token_major", capacity=3)
    keep_choice, _ = _plan(EXPERTS_A, WEIGHTS_A, 1, "choice_major", capacity=3)
    assert keep_token.tolist() == [[T_, T_], [T_, T_], [T_, T_], [F_, T_]]
    assert keep_choice.tolist() == [[T_, T_], [T_, T_], [T_, F_], [T_, T_]]
    # The smallest case, 2 tokens, E=2, capacity 1: t0 (e0 .9, e1 .1), t1 (e1 .8, e0 .2).
    #   token_major: e0 queue t0k0, t1k1; e1 queue t0k1, t1k0 -> t0 keeps both, t1 nothing.
    #   choice_major: e0 queue t0k0, t1k1; e1 queue t1k0, t0k1 -> each keeps its first choice.
    ex, w = [[0, 1], [1, 0]], [[.9, .1], [.8, .2]]
    assert _plan(ex, w, 1, "token_major", 1, 2)[0].tolist() == [[T_, T_], [F_, F_]]
    assert _plan(ex, w, 1, "choice_major", 1, 2)[0].tolist() == [[T_, F_], [T_, F_]]
    # Causality: token 0 alone keeps both slots under either order. token_major's decision for
    # it does not change when token 1 arrives; choice_major's does (t1 evicts t0's 2nd choice).
    assert _plan(ex[:1], w[:1], 1, "choice_major", 1, 2)[0].tolist() == [[T_, T_]]
    assert _plan(ex[:1], w[:1], 1, "token_major", 1, 2)[0].tolist() == [[T_, T_]]


def test_plan_capacity_rejects_unknown_policy():
    with pytest.raises(ValueError, match="drop policy"):
        _plan(EXPERTS_A, WEIGHTS_A, 1, "random")
    with pytest.raises(ValueError, match="drop policy"):
        _plan(EXPERTS_A, WEIGHTS_A, 1, "position")  # renamed: see ModelConfig.validate


# --- plan_capacity against a plain-Python reference, over many random routings ----------------


def reference_plan(weights, experts, n_groups, n_experts, capacity, policy):
    """Loop version of plan_capacity's documented semantics."""
    t, k = experts.shape
    n = t // n_groups
    w, ex = weights.tolist(), experts.tolist()
    rank = [[None] * k for _ in range(t)]
    for g in range(n_groups):
        assignments = [(tok, j) for tok in range(g * n, (g + 1) * n) for j in range(k)]
        order = list(range(len(assignments)))  # token_major: the list's own order
        if policy == "probs":
            order.sort(key=lambda i: (-w[assignments[i][0]][assignments[i][1]], i))
        elif policy == "choice_major":
            order.sort(key=lambda i: (assignments[i][1], i))  # by choice j, then token
        else:
            assert policy == "token_major", policy
        filled = [0] * n_experts
        for i in order:
            tok, j = assignments[i]
            rank[tok][j] = filled[ex[tok][j]]
            filled[ex[tok][j]] += 1
    keep = [[r < capacity for r in row] for row in rank]
    return keep, rank


def random_routing(gen, t, n_experts, k, coarse):
    logits = torch.randn(t, n_experts, generator=gen)
    weights, experts = logits.softmax(-1).topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if coarse:  # many exact ties, to exercise the probs policy's tie-break
        weights = (weights * 4).round() / 4
    return weights, experts


def test_plan_capacity_matches_loop_reference_and_never_overflows():
    gen = torch.Generator().manual_seed(1234)
    n_cases = 0
    for case in range(150):
        n_groups = int(torch.randint(1, 4, (), generator=gen))
        n = int(torch.randint(1, 13, (), generator=gen))
        n_experts = int(torch.randint(1, 9, (), generator=gen))
        k = int(torch.randint(1, n_experts + 1, (), generator=gen))
        cf = [None, 0.25, 0.5, 1.0, 1.25, 2.0][case % 6]
        capacity = expert_capacity(n, k, n_experts, cf, int(torch.randint(0, 3, (),
                                                                            generator=gen)))
        weights, experts = random_routing(gen, n_groups * n, n_experts, k, coarse=case % 3 == 0)
        for policy in DROP_POLICIES:
            keep, rank = plan_capacity(weights, experts, n_groups, n_experts, capacity, policy)
            ref_keep, ref_rank = reference_plan(weights, experts, n_groups, n_experts, capacity,
                                                policy)
            where = f"case {case}: G={n_groups} n={n} E={n_experts} k={k} C={capacity} {policy}"
            assert rank.tolist() == ref_rank, where
            assert keep.tolist() == ref_keep, where
        # The checks below hold for any order; they use the last policy's plan.
        # Per (group, expert): ranks are 0..count-1 and exactly min(count, C) keep a slot.
        e_g = experts.view(n_groups, n * k)
        keep_g, rank_g = keep.view(n_groups, n * k), rank.view(n_groups, n * k)
        for g in range(n_groups):
            for e in range(n_experts):
                mine = e_g[g] == e
                count = int(mine.sum())
                assert sorted(rank_g[g][mine].tolist()) == list(range(count)), where
                assert int(keep_g[g][mine].sum()) == min(count, capacity) <= capacity, where
        if cf is None:
            assert bool(keep.all()), where  # dropless keeps everything
        n_cases += 1
    assert n_cases == 150


# --- Router ------------------------------------------------------------------------------------


def make_router(dim=8, n_experts=5, k=2, jitter=0.0, seed=0, weights="renorm"):
    torch.manual_seed(seed)
    r = Router(dim, n_experts, k, jitter, weights)
    torch.nn.init.normal_(r.gate.weight, std=1.0)
    return r


def test_router_weights_are_renormalised_topk_softmax():
    r = make_router()
    x = torch.randn(16, 8)
    logits, probs, weights, experts = r(x)
    ref_logits = x @ r.gate.weight.T
    ref_probs = torch.softmax(ref_logits, dim=-1)
    top, idx = ref_probs.topk(2, dim=-1)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(probs, ref_probs)
    assert torch.equal(experts, idx)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))
    # Renormalised: the chosen weights are NOT the raw probabilities (those sum to < 1).
    assert (top.sum(-1) < 1 - 1e-3).all()
    # The top-k really are the largest: weight of slot 0 >= slot 1, experts distinct.
    assert (weights[:, 0] >= weights[:, 1]).all() and (experts[:, 0] != experts[:, 1]).all()


def test_router_computes_in_fp32_for_bf16_input():
    r = make_router().to(torch.bfloat16)
    x = torch.randn(64, 8).to(torch.bfloat16)
    logits, probs, weights, _ = r(x)
    assert logits.dtype == probs.dtype == weights.dtype == torch.float32
    assert torch.equal(logits, F.linear(x.float(), r.gate.weight.float()))
    # ... which a bf16 matmul upcast afterwards would not reproduce: the check has teeth.
    assert not torch.equal(logits, F.linear(x, r.gate.weight).float())
    torch.testing.assert_close(weights.sum(-1), torch.ones(64), rtol=0, atol=1e-6)


def test_router_raw_weights_are_the_chosen_probs():
    for k in (1, 2):
        r = make_router(k=k, weights="raw")
        x = torch.randn(16, 8)
        _, probs, weights, experts = r(x)
        assert torch.equal(weights, probs.gather(1, experts))  # not renormalised
        assert (weights.sum(-1) < 1 - 1e-3).all()
    with pytest.raises(ValueError, match="renorm or raw"):
        Router(8, 5, 2, weights="auto")  # auto is resolved by ModelConfig, not here


@pytest.mark.parametrize("weights", ["renorm", "raw"])
def test_router_is_fp32_under_bf16_autocast(weights):
    """Under autocast an F.linear of fp32 tensors runs in bf16; the router turns autocast off, so
    its outputs are fp32 and bitwise equal to the same call without autocast."""
    r = make_router(dim=64, n_experts=16, k=2, weights=weights)
    x = torch.randn(256, 64)
    ref = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, r.gate.weight).dtype == torch.bfloat16  # what autocast would do
        got = r(x)
    for name, a, b in zip(("logits", "probs", "weights"), got[:3], ref[:3]):
        assert a.dtype == torch.float32, name
        assert torch.equal(a, b), name
    assert torch.equal(got[3], ref[3])  # the same experts


@pytest.mark.parametrize("hidden", [24, 8])  # 8 < d_model: the folded combine, off under autocast
def test_moe_layer_router_and_combine_fp32_under_autocast(hidden):
    layer = moe_layer(seed=2, impl="loop", expert_hidden=hidden).train()
    seen, hooks = _capture_router(layer)
    ys, combined = [], []
    hooks.append(layer.experts.register_forward_hook(lambda m, a, out: ys.append(out)))
    run_experts = layer._run_experts

    def spy(x_sorted, counts, capacity, weight):
        out = run_experts(x_sorted, counts, capacity, weight)
        combined.append((x_sorted, weight, out))
        return out

    layer._run_experts = spy
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    for h in hooks:
        h.remove()
    logits, probs, weights, experts = seen[0]
    assert logits.dtype == probs.dtype == weights.dtype == torch.float32
    ref = layer.router(x.reshape(-1, 16))  # fp32, no autocast
    assert torch.equal(weights, ref[2]) and torch.equal(experts, ref[3])
    # The experts run in bf16; each row is weighted in fp32 (a bf16 product would round the
    # weight and the product to 8 bits) and the rows are summed per token in fp32.
    (y,), ((x_sorted, weight, rows),) = ys, combined
    assert y.dtype == torch.bfloat16 and weight.dtype == rows.dtype == torch.float32
    assert torch.equal(rows, y.float() * weight.unsqueeze(1))
    token = (x_sorted[:, None, :] == x.reshape(1, -1, 16)).all(-1).int().argmax(1)
    want = torch.zeros(16, 16).index_add(0, token, rows)
    assert out.dtype == x.dtype and torch.equal(out.reshape(16, 16), want)
    torch.testing.assert_close(out, layer(x), atol=3e-2, rtol=3e-2)  # bf16 experts only


def test_router_jitter_only_in_training():
    r = make_router(jitter=0.3)
    x = torch.randn(32, 8)
    r.eval()
    clean = r(x)[0]
    torch.testing.assert_close(clean, x @ r.gate.weight.T)
    assert torch.equal(r(x)[0], clean)  # deterministic in eval
    r.train()
    torch.manual_seed(7)
    noisy = r(x)[0]
    assert not torch.allclose(noisy, clean)
    # Exactly multiplicative U(1 - eps, 1 + eps) input noise from the global RNG.
    torch.manual_seed(7)
    u = torch.empty_like(x).uniform_(0.7, 1.3)
    torch.testing.assert_close(noisy, (x * u) @ r.gate.weight.T)
    # No jitter configured: training equals eval.
    r0 = make_router(jitter=0.0).train()
    assert torch.equal(r0(x)[0], r0.eval()(x)[0])


# --- router losses -----------------------------------------------------------------------------


def test_load_balancing_loss_uniform_is_one():
    # E=4, k=2, n=4: probs all 1/4; experts 0..3 each chosen twice.
    # f_e = 2/8 = 1/4, P_e = 1/4 -> L = 4 * 4 * (1/4 * 1/4) = 1.0
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert load_balancing_loss(probs, experts, 1).item() == pytest.approx(1.0, abs=1e-7)


def test_load_balancing_loss_collapsed():
    # E=4, k=1: every token routed to expert 0 with probs (.7, .1, .1, .1).
    # f = (1, 0, 0, 0), P = (.7, .1, .1, .1) -> L = 4 * 1 * .7 = 2.8
    probs = torch.tensor([[.7, .1, .1, .1]] * 3)
    experts = torch.zeros(3, 1, dtype=torch.long)
    assert load_balancing_loss(probs, experts, 1).item() == pytest.approx(2.8, abs=1e-6)


def test_load_balancing_loss_hand_case_k2():
    # E=3, k=2, n=2. probs t0 (.5, .3, .2), t1 (.1, .6, .3); experts t0 (0, 1), t1 (1, 2).
    # counts (1, 2, 1) -> f = (1/4, 2/4, 1/4); P = (.3, .45, .25)
    # sum f*P = .075 + .225 + .0625 = .3625 -> L = 3 * .3625 = 1.0875
    probs = torch.tensor([[.5, .3, .2], [.1, .6, .3]])
    experts = torch.tensor([[0, 1], [1, 2]])
    assert load_balancing_loss(probs, experts, 1).item() == pytest.approx(1.0875, abs=1e-6)


def test_load_balancing_loss_is_mean_of_group_losses():
    # E=4, k=1, two groups of two tokens.
    # Group A: probs (.7, .1, .1, .1) twice, both to expert 0     -> L_A = 4 * .7 = 2.8
    # Group B: probs uniform .25, tokens to experts 1 and 2       -> f = (0, .5, .5, 0),
    #          L_B = 4 * (.5 * .25 + .5 * .25) = 1.0
    # Mean: (2.8 + 1.0) / 2 = 1.9. Pooled (one group of 4): f = (.5, .25, .25, 0),
    # P = (.475, .175, .175, .175) -> 4 * (.2375 + .04375 + .04375) = 1.3, which is NOT it.
    probs = torch.tensor([[.7, .1, .1, .1], [.7, .1, .1, .1],
                          [.25, .25, .25, .25], [.25, .25, .25, .25]])
    experts = torch.tensor([[0], [0], [1], [2]])
    assert load_balancing_loss(probs, experts, 2).item() == pytest.approx(1.9, abs=1e-6)
    assert load_balancing_loss(probs, experts, 1).item() == pytest.approx(1.3, abs=1e-6)
    assert load_balancing_loss(probs[:2], experts[:2], 1).item() == pytest.approx(2.8, abs=1e-6)


def test_router_z_loss_by_hand():
    # logsumexp(0, 0, 0, 0) = ln 4;  logsumexp(ln 2, ln 2, 0, 0) = ln(2 + 2 + 1 + 1) = ln 6
    # z = ((ln 4)^2 + (ln 6)^2) / 2
    logits = torch.tensor([[0., 0., 0., 0.], [math.log(2), math.log(2), 0., 0.]])
    expected = (math.log(4) ** 2 + math.log(6) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # Large logits: logsumexp(100, 0) = 100 + log1p(e^-100) = 100 -> z = 10000 (no overflow).
    assert router_z_loss(torch.tensor([[100., 0.]])).item() == pytest.approx(10000.0, rel=1e-6)


# --- MoE layer: combine and statistics ---------------------------------------------------------


def moe_layer(seed=0, impl="loop", std=0.3, **kw):
    base = dict(d_model=16, n_experts=4, top_k=2, expert_hidden=24, capacity_factor=1.0,
                eval_capacity_factor=1.0, min_capacity=0, capacity_group_seqs=1,
                expert_impl=impl)
    base.update(kw)
    cfg = ModelConfig(**base)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    layer.init_weights(std, std)
    return layer


def expert_fn(layer, e, x):
    ex = layer.experts
    h = x @ ex.w1[e]
    h = F.silu(h) * (x @ ex.w3[e]) if ex.w3 is not None else F.gelu(h)
    return h @ ex.w2[e]


def reference_moe(layer, x):
    """Token-by-token loop: out[t] = sum over kept slots j of weight[t, j] * expert_j(x_t)."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    logits = flat @ layer.router.gate.weight.T
    probs = logits.softmax(-1)
    w, ex = probs.topk(layer.top_k, dim=-1)
    if layer.router.renorm:
        w = w / w.sum(-1, keepdim=True)
    n_groups = b // layer.group_seqs
    cap = layer.capacity(flat.shape[0] // n_groups)
    keep, _ = reference_plan(w, ex, n_groups, layer.n_experts, cap, layer.router.drop_policy)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(layer.top_k):
            if keep[t][j]:
                out[t] += w[t, j] * expert_fn(layer, int(ex[t, j]), flat[t])
    return out.view(b, s, d), torch.tensor(keep), ex


def routed_inputs(routes, d_model=16, n_experts=4, seed=0):
    """Inputs whose first n_experts coordinates pick the experts: with gate = 10 * identity on
    those coordinates, a token with x[a] = 1, x[b] = .8 (others 0) routes to (a, b)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(routes), d_model, generator=g)
    x[:, :n_experts] = 0
    for t, (a, b) in enumerate(routes):
        x[t, a], x[t, b] = 1.0, 0.8
    return x


def test_combine_drops_by_hand():
    layer = moe_layer(min_capacity=2, capacity_factor=0.1,  # capacity max(2, 1) = 2
                      drop_policy="token_major").train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :4] = 10 * torch.eye(4)
    # token_major policy, capacity 2 per expert, one group of 6 tokens:
    #   t0 (0,1) e0 r0, e1 r0 | t1 (0,1) e0 r1, e1 r1 | t2 (0,2) e0 r2 DROP, e2 r0
    #   t3 (1,0) e1 r2 DROP, e0 r3 DROP | t4 (2,3) e2 r1, e3 r0 | t5 (3,0) e3 r1, e0 r4 DROP
    routes = [(0, 1), (0, 1), (0, 2), (1, 0), (2, 3), (3, 0)]
    x = routed_inputs(routes).view(1, 6, 16)
    with torch.no_grad():
        out = layer(x)[0]
    flat = x[0]
    logits = flat @ layer.router.gate.weight.T
    w, ex = logits.softmax(-1).topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    assert ex.tolist() == [list(r) for r in routes]
    keep, _ = plan_capacity(w, ex, 1, 4, 2, "token_major")
    assert keep.tolist() == [[T_, T_], [T_, T_], [F_, T_], [F_, F_], [T_, T_], [T_, F_]]
    with torch.no_grad():
        f = {(t, e): expert_fn(layer, e, flat[t]) for t in range(6) for e in range(4)}
        # Both kept: the weighted sum of the two experts.
        torch.testing.assert_close(out[0], w[0, 0] * f[0, 0] + w[0, 1] * f[0, 1])
        # One dropped: only the other expert, with its weight NOT renormalised.
        torch.testing.assert_close(out[2], w[2, 1] * f[2, 2])
        torch.testing.assert_close(out[5], w[5, 0] * f[5, 3])
        assert w[5, 0] < 0.99
    # Both dropped: exactly zero.
    assert torch.equal(out[3], torch.zeros(16))
    st = layer.last_stats
    # Counts before dropping: e0 gets t0 t1 t2 t3 t5, e1 t0 t1 t3, e2 t2 t4, e3 t4 t5.
    assert st.tokens_per_expert.tolist() == [5, 3, 2, 2]
    assert st.kept_per_expert.tolist() == [2, 2, 2, 2]
    assert st.n_tokens == 6
    assert st.drop_frac() == pytest.approx(4 / 12)  # 4 of 12 assignments dropped


@pytest.mark.parametrize("impl", ["loop", "grouped", "bmm"])
@pytest.mark.parametrize("policy", DROP_POLICIES)
@pytest.mark.parametrize("group_seqs", [1, 2])
@pytest.mark.parametrize("top_k, router_weights", [(2, "auto"), (2, "raw"), (1, "auto")])
def test_moe_layer_matches_token_loop(impl, policy, group_seqs, top_k, router_weights):
    layer = moe_layer(seed=3, impl=impl, drop_policy=policy, capacity_group_seqs=group_seqs,
                      capacity_factor=0.75, top_k=top_k, router_weights=router_weights).train()
    assert layer.router.renorm == (top_k == 2 and router_weights == "auto")
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        out = layer(x)
        ref, keep, ex = reference_moe(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    st = layer.last_stats
    assert 0 < (~keep).sum()  # drops really happened
    assert st.drop_frac() == pytest.approx(float((~keep).float().mean()))
    assert st.tokens_per_expert.tolist() == torch.bincount(ex.flatten(), minlength=4).tolist()
    kept = torch.bincount(ex[keep], minlength=4)
    assert st.kept_per_expert.tolist() == kept.tolist()
    assert st.n_tokens == 24


# --- router_weights: a top-1 gate learns from the LM loss ----------------------------------------


def _top1_model(router_weights, seed=0):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                      max_seq_len=16, n_experts=4, top_k=1, expert_hidden=32,
                      capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0,
                      router_weights=router_weights, init_std=0.1)
    cfg.validate()
    torch.manual_seed(seed)
    return build_model(cfg).train()


def _lm_loss(model, tokens):
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           tokens[:, 1:].reshape(-1))


def _gate_names(model):
    return [n for n, _ in model.named_parameters() if n.endswith("router.gate.weight")]


@pytest.mark.parametrize("router_weights", ["auto", "raw", "renorm"])
def test_top1_gate_gradient_from_lm_loss_alone(router_weights):
    """aux and z coefficients 0: the gate's only gradient is the LM loss's, through the combine
    weight. Renormalising one weight gives w / w = 1, so renorm leaves only round-off."""
    model = _top1_model(router_weights)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    _lm_loss(model, tokens).backward()
    params = dict(model.named_parameters())
    norms = [float(params[n].grad.norm()) for n in _gate_names(model)]
    assert len(norms) == 2
    if router_weights == "renorm":
        assert max(norms) < 1e-7, norms
    else:
        assert min(norms) > 1e-4, norms


def test_top1_router_moves_in_a_short_run():
    """A few AdamW steps (the trainer's optimizer) on the LM loss alone: the raw (auto) top-1
    gate moves and the LM loss falls; a renormalised one moves only by round-off steps."""
    from moe.config import TrainConfig
    from moe.optim import build_optimizer

    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    moved = {}
    for rw in ("auto", "renorm"):
        model = _top1_model(rw)
        opt = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0,
                                                 optimizer_impl="for-loop"))
        gates = {n: p for n, p in model.named_parameters() if n in _gate_names(model)}
        start = {n: p.detach().clone() for n, p in gates.items()}
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = _lm_loss(model, tokens)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        moved[rw] = min(float((p.detach() - start[n]).abs().max()) for n, p in gates.items())
        if rw == "auto":
            assert losses[-1] < losses[0]
    assert moved["auto"] > 1e-2  # ~lr per step: Adam normalises a real gradient
    assert moved["renorm"] < 0.2 * moved["auto"]  # measured: 0.06


def test_export_refuses_raw_router_weights():
    from moe.hf.export import ExportError, check_exportable, to_mixtral

    raw = _top1_model("auto")  # top-1 auto = raw (Switch): Mixtral would give every token 1
    with pytest.raises(ExportError, match="model.router_weights='auto' with top_k=1.*renorm"):
        to_mixtral(raw)
    k2 = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16,
                     n_experts=4, top_k=2, expert_hidden=32, router_weights="raw")
    with pytest.raises(ExportError, match="model.router_weights"):
        check_exportable(build_model(k2))
    to_mixtral(_top1_model("renorm"))  # renorm is Mixtral's rule, at any top_k


def test_moe_layer_dropless_keeps_everything():
    layer = moe_layer(seed=4, capacity_factor=None, eval_capacity_factor=None).train()
    x = torch.randn(3, 8, 16)
    with torch.no_grad():
        out = layer(x)
        ref, keep, _ = reference_moe(layer, x)
    assert keep.all() and layer.last_stats.drop_frac() == 0.0
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_moe_rejects_partial_capacity_group():
    layer = moe_layer(capacity_group_seqs=2)
    with pytest.raises(ValueError, match="capacity_group_seqs"):
        layer(torch.randn(3, 4, 16))


# --- router-loss gradient injection ------------------------------------------------------------


def _grads(module, x):
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters()
                                    if p.grad is not None}}


def _capture_router(module):
    """Forward hooks that record each router's (logits, probs, weights, experts)."""
    seen = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
             for m in module.modules() if isinstance(m, MoE)]
    return seen, hooks


@pytest.mark.parametrize("loss_scale", [1.0, 0.25])
@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_router_loss_gradient_injection_single_layer(loss_scale, jitter):
    aux_coef, z_coef = 0.3, 0.05
    layer = moe_layer(seed=5, aux_loss_coef=aux_coef, z_loss_coef=z_coef, router_jitter=jitter,
                      capacity_factor=1.0, drop_policy="probs", capacity_group_seqs=2).train()
    layer.loss_scale = loss_scale
    x0 = torch.randn(4, 6, 16)
    target = torch.randn(4, 6, 16)

    def lm_loss(out):
        return ((out - target) ** 2).mean()

    # (1) Injected: backward of the LM loss alone.
    x = x0.clone().requires_grad_()
    torch.manual_seed(11)
    lm_loss(layer(x)).backward()
    injected = _grads(layer, x)
    aux_value, z_value = layer.last_stats.aux_loss, layer.last_stats.z_loss

    # (2) Explicit: coefficients 0 (the injection adds nothing), same seed, and the router
    # losses recomputed from the captured router outputs and added to the loss by hand.
    layer.zero_grad()
    layer.aux_loss_coef = layer.z_loss_coef = 0.0
    seen, hooks = _capture_router(layer)
    x = x0.clone().requires_grad_()
    torch.manual_seed(11)
    out = layer(x)
    for h in hooks:
        h.remove()
    logits, probs, _, experts = seen[0]
    aux = load_balancing_loss(probs, experts, n_groups=2)
    z = router_z_loss(logits)
    torch.testing.assert_close(aux.detach(), aux_value)
    torch.testing.assert_close(z.detach(), z_value)
    assert layer.layer_weight == 1.0
    total = lm_loss(out) + layer.layer_weight * loss_scale * (aux_coef * aux + z_coef * z)
    total.backward()
    explicit = _grads(layer, x)

    # (3) LM loss only, to show the router losses change the gradient measurably.
    layer.zero_grad()
    x = x0.clone().requires_grad_()
    torch.manual_seed(11)
    lm_loss(layer(x)).backward()
    plain = _grads(layer, x)

    assert set(injected) == set(explicit)
    for name in injected:
        torch.testing.assert_close(injected[name], explicit[name], atol=1e-7, rtol=1e-5,
                                   msg=name)
    gate = "router.gate.weight"
    assert (injected[gate] - plain[gate]).abs().max() > 1e-4
    assert (injected["x"] - plain["x"]).abs().max() > 1e-7  # z-loss reaches the input too


def test_router_loss_injection_scales_with_loss_scale():
    layer = moe_layer(seed=6, aux_loss_coef=0.5, z_loss_coef=0.1).train()
    x = torch.randn(2, 8, 16)

    def gate_grad(scale, lm_weight):
        layer.zero_grad()
        layer.loss_scale = scale
        (lm_weight * layer(x).pow(2).mean()).backward()
        return layer.router.gate.weight.grad.clone()

    # An LM loss multiplied by 0 still sends a (zero) gradient through the layer, so only the
    # injected router-loss gradient remains: exactly proportional to loss_scale.
    g0, g1, g3 = gate_grad(0.0, 0.0), gate_grad(1.0, 0.0), gate_grad(3.0, 0.0)
    assert torch.equal(g0, torch.zeros_like(g0)) and g1.abs().max() > 1e-3
    torch.testing.assert_close(g3, 3 * g1, atol=1e-7, rtol=1e-5)
    # With a real LM loss the injected part is added on top of it.
    lm0, lm1 = gate_grad(0.0, 1.0), gate_grad(1.0, 1.0)
    torch.testing.assert_close(lm1 - lm0, g1, atol=1e-6, rtol=1e-4)


def test_no_injection_in_eval_or_no_grad():
    layer = moe_layer(seed=7, aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(2, 8, 16)
    layer.eval()
    layer(x).pow(2).sum().backward()
    g_eval = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    layer.aux_loss_coef = layer.z_loss_coef = 0.0
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.router.gate.weight.grad, g_eval, rtol=0, atol=0)
    layer.train()
    with torch.no_grad():
        out = layer(x)
    assert not out.requires_grad and layer.last_stats.aux_loss > 0


def test_router_loss_injection_in_full_model_averages_layers():
    # Two MoE layers: each injects layer_weight = 1/2 of its coefficient-weighted losses.
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                      max_seq_len=16, n_experts=4, top_k=2, expert_hidden=32,
                      capacity_factor=1.0, min_capacity=0, aux_loss_coef=0.2,
                      z_loss_coef=0.05)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.set_loss_scale(0.5)
    tokens = torch.randint(0, 64, (2, 16))

    def lm_loss(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))

    lm_loss(model(tokens)).backward()
    injected = {n: p.grad.clone() for n, p in model.named_parameters()}
    router_loss_logged = sum(m.router_loss() for m in model.moe_layers())

    model.zero_grad()
    for m in model.moe_layers():
        assert m.layer_weight == 0.5 and m.loss_scale == 0.5
        m.aux_loss_coef = m.z_loss_coef = 0.0
    seen, hooks = _capture_router(model)
    logits = model(tokens)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    extra = sum(0.5 * (0.2 * load_balancing_loss(p, e, 2) + 0.05 * router_z_loss(lg))
                for lg, p, _, e in seen)
    torch.testing.assert_close(extra.detach(), router_loss_logged)
    (lm_loss(logits) + 0.5 * extra).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(injected[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)
