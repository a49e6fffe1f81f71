"""Routing research options: sigmoid scores, bias balancing (DeepSeek-V3), the sequence-wise
balance loss, shared experts (DeepSeekMoE), expert-choice routing (Zhou et al. 2022), the
granularity grid key, and bias-balanced runs that match one process on every layout."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_ranks

from moe.ablate.points import fixed_compute, make_points, parse_grid
from moe.accounting.params import count_params
from moe.checkpoint import full_state
from moe.config import ConfigError, ModelConfig, load_config
from moe.model import MoE, build_model
from moe.model.balance import bias_update, update_expert_biases
from moe.model.layers import FeedForward
from moe.model.router import (
    Router,
    RouterBase,
    RoutingPlan,
    expert_choice_plan,
    load_balancing_loss,
    sequence_balance_loss,
)
from moe.train.loop import train
from tests.helpers import assert_same_rows, read_rows, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


# --- the bias update ---------------------------------------------------------------------------


def test_bias_update_on_hand_made_loads():
    bias = torch.tensor([0.0, 0.1, -0.2, 0.0])
    load = torch.tensor([5, 1, 3, 3])  # mean 3: over, under, at, at
    new = bias_update(bias, load, 0.01)
    assert torch.allclose(new, torch.tensor([-0.01, 0.11, -0.2, 0.0]), atol=0, rtol=1e-6)
    assert new.dtype == torch.float32 and torch.equal(bias, torch.tensor([0.0, 0.1, -0.2, 0.0]))


def test_update_expert_biases_uses_each_layers_row_and_skips_missing_layers():
    cfg = ModelConfig(d_model=8, n_experts=4, top_k=2, expert_hidden=8, balance="bias",
                      bias_update_rate=0.5)
    layer = MoE(cfg)
    layer.init_weights(0.1, 0.1, seed=0)
    assert torch.equal(layer.router.expert_bias, torch.zeros(4))  # init: unbiased
    tokens = torch.tensor([[9., 0., 0., 0.], [1., 2., 3., 2.]], dtype=torch.float64)
    # A pipeline rank holding only layer "3" of the MoE layers ["1", "3"]: row 1 is its own.
    assert update_expert_biases({"3": layer}, ["1", "3"], tokens) == 1
    assert torch.equal(layer.router.expert_bias, torch.tensor([0.5, 0.0, -0.5, 0.0]))
    assert update_expert_biases({}, ["1", "3"], tokens) == 0  # a rank with no MoE layer
    plain = MoE(ModelConfig(d_model=8, n_experts=4, top_k=2, expert_hidden=8))
    assert plain.router.expert_bias is None and update_expert_biases({"1": plain}, ["1"],
                                                                      tokens[:1]) == 0


def _router(score="softmax", bias=False, weights="renorm", scale=1.0, k=2):
    r = Router(4, 4, k, weights=weights, score=score, route_scale=scale, bias=bias)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4))  # logits = x
    return r


def test_bias_chooses_the_experts_but_the_scores_weigh_them():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = _router("sigmoid", bias=True)
    s = torch.sigmoid(x[0])
    _, _, w, e = r(x)
    assert e.tolist() == [[0, 1]]
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))  # s + b = .88, .73, 1.0, .27
    logits, probs, w, e = r(x)
    assert e.tolist() == [[2, 0]]
    assert torch.allclose(w[0], torch.stack([s[2], s[0]]) / (s[2] + s[0]))  # unbiased scores
    assert torch.allclose(probs[0], s / s.sum()) and torch.equal(logits, x)


def test_sigmoid_routing_on_hand_made_logits():
    x = torch.tensor([[0.0, 3.0, -2.0, 1.0], [4.0, -4.0, 0.5, 0.0]])
    s = torch.sigmoid(x)
    # renorm: the chosen sigmoid scores over their sum, times route_scale (DeepSeek-V3 eq. 13)
    _, probs, w, e = _router("sigmoid", scale=2.5)(x)
    assert e.tolist() == [[1, 3], [0, 2]]
    want = torch.stack([s[0, [1, 3]] / s[0, [1, 3]].sum(), s[1, [0, 2]] / s[1, [0, 2]].sum()])
    assert torch.allclose(w, 2.5 * want)
    assert torch.allclose(probs, s / s.sum(-1, keepdim=True))
    # raw: the sigmoid scores themselves
    _, _, w, e = _router("sigmoid", weights="raw")(x)
    assert torch.allclose(w, torch.stack([s[0, [1, 3]], s[1, [0, 2]]]))
    # softmax keeps the old behaviour bit for bit
    _, probs, w, e = _router("softmax")(x)
    p = x.softmax(-1)
    assert torch.equal(probs, p) and e.tolist() == [[1, 3], [0, 2]]
    assert torch.allclose(w[0], p[0, [1, 3]] / p[0, [1, 3]].sum())


def test_sequence_balance_loss_by_hand():
    # Two sequences of two tokens, E=2, top-1. Seq 0: both to expert 0, P = (.8, .2):
    # f = 2/(1*2) * (2, 0) = (2, 0) -> 1.6. Seq 1: one each, P = (.4, .6): f = (1, 1) -> 1.0.
    probs = torch.tensor([[.9, .1], [.7, .3], [.6, .4], [.2, .8]])
    experts = torch.tensor([[0], [0], [0], [1]])
    assert sequence_balance_loss(probs, experts, 2).item() == pytest.approx(1.3)
    assert load_balancing_loss(probs, experts, 1).item() == pytest.approx(
        2 * (3 / 4 * 0.6 + 1 / 4 * 0.4))  # one group of 4: a different number


def test_moe_sequence_loss_is_per_sequence_whatever_the_capacity_group():
    layer = _moe(seq_aux_loss_coef=0.1, capacity_group_seqs=2, router_score="sigmoid")
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(0))
    layer(x)
    logits, probs, _, experts = layer.router(x.reshape(-1, 16))
    want = sequence_balance_loss(probs, experts, 4)
    assert layer.last_stats.seq_aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert layer.router_loss().item() == pytest.approx(
        0.01 * layer.last_stats.aux_loss.item() + 0.001 * layer.last_stats.z_loss.item()
        + 0.1 * want.item(), rel=1e-6)


def test_aux_loss_is_applied_only_with_balance_aux_loss():
    """The gate's gradient from a step whose LM loss is zero is the router losses' alone:
    with z_loss_coef=0 it is exactly 0.01 x d(aux)/dW under balance=aux_loss, and exactly
    zero under bias and none (the aux loss is still computed and logged)."""
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    for balance in ("aux_loss", "bias", "none"):
        layer = _moe(balance=balance, z_loss_coef=0.0).train()
        out = layer(x)
        (out * 0).sum().backward()  # no LM gradient: only what the layer injects
        got = layer.router.gate.weight.grad
        w = layer.router.gate.weight.detach().clone().requires_grad_()
        probs = F.linear(x.reshape(-1, 16), w).softmax(-1)
        aux = load_balancing_loss(probs, layer.last_experts, n_groups=2)
        assert float(layer.last_stats.aux_loss) == pytest.approx(float(aux.detach()), rel=1e-6)
        (want,) = torch.autograd.grad(0.01 * aux, w)
        if balance == "aux_loss":
            assert want.abs().max() > 1e-6
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        else:
            assert got is None or torch.count_nonzero(got) == 0, balance


# --- shared experts ----------------------------------------------------------------------------


def _moe(seed=0, **kw):
    base = dict(d_model=16, n_experts=4, top_k=2, expert_hidden=24, capacity_factor=1.0,
                min_capacity=0, expert_impl="loop", aux_loss_coef=0.01, z_loss_coef=0.001)
    cfg = ModelConfig(**{**base, **kw})
    cfg.validate()
    layer = MoE(cfg)
    layer.init_weights(0.3, 0.3, seed=seed)
    return layer


def test_one_shared_expert_and_no_routed_experts_is_the_dense_ffn():
    dense_cfg = tiny_model_config(moe_every=3)  # 2 layers, none MoE: FeedForward(32, 48)
    shared_cfg = tiny_model_config(n_experts=0, top_k=0, n_shared_experts=1,
                                   shared_expert_hidden=48)
    dense, shared = build_model(dense_cfg, seed=0), build_model(shared_cfg, seed=1)
    rename = {n: n.replace("feed_forward.", "feed_forward.shared_experts.")
              for n, _ in dense.named_parameters()}
    state = {rename[n]: p for n, p in dense.state_dict().items() if n in rename}
    shared.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = dense(tokens), shared(tokens)
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    got = dict(shared.named_parameters())
    for n, p in dense.named_parameters():
        assert torch.equal(p.grad, got[rename[n]].grad), n
    assert count_params(shared_cfg).total_params == count_params(dense_cfg).total_params
    assert count_params(shared_cfg).active_params == count_params(dense_cfg).active_params


def test_shared_experts_add_an_always_on_ffn():
    plain = _moe(seed=3)
    both = _moe(seed=3, n_shared_experts=2, shared_expert_hidden=8)
    assert isinstance(both.shared_experts, FeedForward)
    assert both.shared_experts.w1.weight.shape == (16, 16)  # 2 experts x 8 as one FFN
    both.router.load_state_dict(plain.router.state_dict())
    both.experts.load_state_dict(plain.experts.state_dict())
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(both(x), plain(x) + both.shared_experts(x), atol=1e-6)


def test_accounting_counts_shared_experts():
    for kw in (dict(n_shared_experts=2, shared_expert_hidden=16),
               dict(n_experts=0, top_k=0, n_shared_experts=1), dict(moe_every=2,
                                                                    n_shared_experts=1)):
        cfg = tiny_model_config(**kw)
        meta, formula = count_params(cfg), count_params(cfg, "analytic")
        assert meta == formula, kw
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        assert meta.shared_expert_params == n_moe * 3 * cfg.d_model * cfg.shared_hidden_total
        plain = count_params(tiny_model_config(**{**kw, "n_shared_experts": 0, "n_experts": 4,
                                                  "top_k": 2}))
        # the shared FFN counts fully in the active parameters
        assert meta.active_params - meta.shared_expert_params - meta.active_expert_params \
            - meta.router_params == plain.active_params - plain.active_expert_params \
            - plain.router_params


# --- small experts: folded combine weights, w1 | w3 in one grouped matmul ---------------------


@pytest.mark.parametrize("impl", ["loop", "grouped", "bmm"])
def test_folded_scale_equals_scaling_the_output(impl):
    """GroupedExperts(x, scale=s) == s * GroupedExperts(x), values and gradients, for narrow
    experts (8 * hidden <= dim: grouped runs w1 | w3 as one matmul) with an empty expert."""
    from moe.model.experts import GroupedExperts

    ex = GroupedExperts(4, 32, 4, "swiglu", impl)
    ex.init_weights(0.3, 0.3, seed=0)
    counts = torch.tensor([3, 0, 5, 2])
    g = torch.Generator().manual_seed(0)
    x0, s0, dy = torch.randn(10, 32, generator=g), torch.rand(10, generator=g), torch.randn(10, 32)
    outs = []
    for fold in (True, False):
        ex.zero_grad()
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = ex(x, counts, 5, scale=s) if fold else ex(x, counts, 5) * s.unsqueeze(1)
        (y * dy).sum().backward()
        outs.append([y, x.grad, s.grad] + [p.grad.clone() for p in ex.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = GroupedExperts(4, 32, 4, "swiglu", "loop")
    ref.load_state_dict(ex.state_dict())
    torch.testing.assert_close(ex(x0, counts, 5), ref(x0, counts, 5), atol=1e-5, rtol=1e-5)


def test_moe_folds_the_combine_for_narrow_experts_only():
    narrow = _moe(d_model=32, expert_hidden=4, expert_impl="grouped")
    wide = _moe(d_model=32, expert_hidden=48)
    assert narrow.fold_combine and not wide.fold_combine
    ref = _moe(d_model=32, expert_hidden=4, expert_impl="grouped")
    ref.fold_combine = False
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(narrow(x), ref(x), atol=1e-6, rtol=1e-5)


def test_bench_expert_counts_hold_parameters_and_report_ratios():
    from moe.bench.step import expert_count_config, run_expert_counts

    cfg = load_config(str(ROOT / "configs" / "bench.yaml"), [
        "--model.n_layers=1", "--model.d_model=64", "--model.n_heads=4", "--model.vocab_size=512",
        "--model.expert_hidden=64", "--data.seq_len=32", "--model.max_seq_len=32",
        "--train.batch_size=2", "--train.micro_batch_size=2", "--train.device=cpu",
        "--train.threads=1"])
    fine = [expert_count_config(cfg.model, n) for n in (8, 16, 64)]
    assert [(m.n_experts, m.top_k, m.expert_hidden) for m in fine] == [
        (8, 2, 64), (16, 4, 32), (64, 16, 8)]
    assert len({count_params(m).active_expert_params for m in fine}) == 1
    assert len({count_params(m).expert_params for m in fine}) == 1
    same = expert_count_config(cfg.model, 64, "same")
    assert (same.top_k, same.expert_hidden) == (2, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        expert_count_config(cfg.model, 12)
    r = run_expert_counts(cfg, (8, 16), steps=1, warmup=0)
    assert r["counts"]["8"]["ratio"] == 1.0 and r["counts"]["16"]["fwd_bwd_tokens_per_s"] > 0
    assert r["counts"]["16"]["top_k"] == 4 and r["loadavg_start"] is not None
    assert r["counts"]["8"]["experts_only_ratio"] == 1.0
    # Both are timings (positive); which is smaller is the benchmark's finding, not a property:
    # on a loaded machine one step of the part can take longer than one step of the whole.
    assert r["counts"]["16"]["experts_fwd_bwd_s_median"] > 0
    assert r["counts"]["16"]["fwd_bwd_s_median"] > 0


def test_experts_alone_replays_each_layers_real_loads():
    """The expert-only timing of the expert-count benchmark runs each MoE layer's experts on
    the rows per expert that layer's routing kept, one call per layer, with gradients."""
    from moe.bench.step import ExpertsAlone, Stepper

    cfg = load_config(str(ROOT / "configs" / "bench.yaml"), [
        "--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.vocab_size=512",
        "--model.expert_hidden=64", "--data.seq_len=32", "--model.max_seq_len=32",
        "--train.batch_size=2", "--train.micro_batch_size=2", "--train.device=cpu",
        "--train.threads=1"])
    s = Stepper(cfg, cfg.model, torch.device("cpu"), None)
    alone = ExpertsAlone(s)
    layers = list(s.model.moe_layers())
    assert [m for m, *_ in alone.calls] == [m.experts for m in layers]
    for (_, counts, _, _), layer in zip(alone.calls, layers):
        assert torch.equal(counts, layer.last_stats.kept_per_expert)
    assert alone.fwd_bwd() > 0
    assert all(p.grad is None for p in s.model.parameters())  # left as it found them


# --- expert choice ------------------------------------------------------------------------------


def test_expert_choice_plan_by_hand():
    scores = torch.tensor([[.9, .1], [.2, .8], [.6, .4], [.5, .5]])  # one group of 4, E=2
    token, weight, counts = expert_choice_plan(scores, 1, 2)
    assert token.tolist() == [0, 2, 1, 3] and counts.tolist() == [2, 2]
    assert torch.equal(weight, torch.tensor([.9, .6, .8, .5]))
    token, _, counts = expert_choice_plan(scores, 2, 1)  # two groups of 2
    assert token.tolist() == [0, 2, 1, 3] and counts.tolist() == [2, 2]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_fills_every_expert_to_capacity_and_matches_a_loop(score):
    layer = _moe(routing="expert_choice", balance="none", capacity_group_seqs=2,
                 router_score=score, route_scale=1.5)
    b, s, d = 4, 8, 16
    x = torch.randn(b, s, d, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    cap = layer.capacity(2 * s)  # ceil(1.0 * 16 * 2 / 4) = 8
    assert cap == 8
    st = layer.last_stats
    assert st.kept_per_expert.tolist() == [2 * cap] * 4 == st.tokens_per_expert.tolist()
    # Reference: per group and expert, the cap highest-scoring tokens, in a Python loop.
    flat = x.reshape(-1, d)
    logits = flat @ layer.router.gate.weight.T
    sc = (logits.softmax(-1) if score == "softmax" else logits.sigmoid()).detach()
    ref = torch.zeros_like(flat)
    for g in range(b // 2):
        rows = range(g * 2 * s, (g + 1) * 2 * s)
        for e in range(4):
            ranked = sorted(rows, key=lambda t: -float(sc[t, e]))[:cap]
            assert len(set(ranked)) == cap <= 2 * s  # never over capacity, no token twice
            for t in ranked:
                ex = layer.experts
                h = F.silu(flat[t] @ ex.w1[e]) * (flat[t] @ ex.w3[e])
                ref[t] += 1.5 * sc[t, e] * (h @ ex.w2[e])
    assert torch.allclose(out.reshape(-1, d), ref, atol=1e-5)
    out.sum().backward()  # the gate learns through the combine weights
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_expert_choice_refuses_balance_losses_and_dropless():
    ec = dict(routing="expert_choice", balance="none")
    tiny_model_config(**ec)  # the accepted baseline: every case below changes one key
    for kw, match in ((dict(balance="aux_loss"), r"balance=none \(got aux_loss\)"),
                      (dict(balance="bias"), r"balance=none \(got bias\)"),
                      (dict(seq_aux_loss_coef=0.01), r"seq_aux_loss_coef=0 \(got 0.01\)"),
                      (dict(capacity_factor=None), "needs a capacity"),
                      (dict(eval_capacity_factor=None), "needs a capacity"),
                      (dict(capacity_factor=None, eval_capacity_factor=1.0), "needs a capacity"),
                      (dict(drop_policy="probs"), r"model.drop_policy \(got probs\)"),
                      (dict(router_weights="renorm"), r"model.router_weights \(got renorm\)")):
        with pytest.raises(ConfigError, match=match):
            tiny_model_config(**{**ec, **kw})
    # A capacity that is every token of the group: refused where data.seq_len is known.
    over = ["--model.routing=expert_choice", "--model.balance=none", "--model.n_experts=4",
            "--model.capacity_factor=2", "--data.seq_len=64", "--model.max_seq_len=64"]
    with pytest.raises(ConfigError, match="every expert takes every token"):
        load_config(None, over)
    load_config(None, over[:-3] + ["--model.capacity_factor=1.5"])  # ceil(1.5 * 256 / 2) < 256


def test_generation_and_export_refuse_expert_choice():
    from moe.hf.export import ExportError, check_exportable
    from moe.inference.generate import generate

    model = build_model(tiny_model_config(routing="expert_choice", balance="none"), seed=0)
    with pytest.raises(ValueError, match="expert_choice is not causal"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ExportError, match="expert_choice is not causal"):
        check_exportable(model)
    for kw in (dict(router_score="sigmoid"), dict(balance="bias"), dict(n_shared_experts=1),
               dict(route_scale=2.0)):
        with pytest.raises(ExportError, match=next(iter(kw))):
            check_exportable(build_model(tiny_model_config(**kw), "meta"))


def test_generation_with_shared_experts_bias_and_sigmoid_matches_full_forwards():
    """The KV-cached decode (few-token MoE path) adds the shared experts and chooses with the
    bias as the full forward does: greedy tokens equal an argmax loop over full forwards."""
    from moe.inference.generate import generate

    model = build_model(tiny_model_config(n_shared_experts=1, balance="bias",
                                          router_score="sigmoid", route_scale=2.0,
                                          capacity_factor=None), seed=0).eval()
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    prompt = torch.tensor([[1, 5, 9]])
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_batch_dependence_tool_sees_shared_experts_and_refuses_expert_choice():
    from moe.analysis.batch import group_forward

    model = build_model(tiny_model_config(n_shared_experts=1, balance="bias",
                                          router_score="sigmoid", capacity_group_seqs=2,
                                          eval_capacity_factor=0.5), seed=0).eval()
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.2, -0.1, 0.0]))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    logits, _ = group_forward(model, x[1], x[:1], 1, 0.5)
    torch.testing.assert_close(logits, ref[1], rtol=1e-4, atol=1e-5)
    ec = build_model(tiny_model_config(routing="expert_choice", balance="none"), seed=0)
    with pytest.raises(ValueError, match="token-choice"):
        group_forward(ec, x[1], x[:1], 1, 0.5)


def test_routing_config_errors_name_the_key():
    for kw, match in ((dict(router_score="relu"), "model.router_score"),
                      (dict(balance="loss"), "model.balance"),
                      (dict(routing="hash"), "model.routing"),
                      (dict(route_scale=0.0), "model.route_scale"),
                      (dict(bias_update_rate=-1.0), "model.bias_update_rate"),
                      (dict(n_shared_experts=-1), "model.n_shared_experts"),
                      (dict(n_experts=0), "model.n_experts=0"),
                      (dict(n_experts=0, top_k=0), "n_shared_experts >= 1")):
        with pytest.raises(ConfigError, match=match):
            tiny_model_config(**kw)


def test_bias_buffer_is_zero_when_materialised_from_meta():
    model = build_model(tiny_model_config(balance="bias"), "cpu", seed=0)
    biases = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert sorted(biases) == ["layers.0.feed_forward.router.expert_bias",
                              "layers.1.feed_forward.router.expert_bias"]
    assert all(torch.equal(b, torch.zeros(4)) for b in biases.values())
    assert set(biases) <= set(model.state_dict())  # persistent: checkpointed


# --- granularity and the fixed-compute rule ---------------------------------------------------


def test_fixed_compute_with_granularity_and_shared_experts():
    base = load_config(str(ROOT / "configs" / "ablate_routing.yaml"))
    m = base.model  # 16 experts of 128, top-2: W = 256
    assert (m.n_experts, m.top_k, m.expert_hidden, m.n_shared_experts) == (16, 2, 128, 0)
    assert fixed_compute(base, {"granularity": 4}) == {
        "model.n_experts": 64, "model.expert_hidden": 32, "model.top_k": 8}
    assert fixed_compute(base, {"model.n_shared_experts": 1}) == {"model.top_k": 1}
    # The shared expert keeps its 128 units (4 of the 32-wide experts' worth): 8 - 4 routed.
    assert fixed_compute(base, {"granularity": 4, "model.n_shared_experts": 1}) == {
        "model.n_experts": 64, "model.expert_hidden": 32, "model.shared_expert_hidden": 128,
        "model.top_k": 4}
    # A shared width the grid sets itself is never adjusted.
    assert fixed_compute(base, {"granularity": 4, "model.n_shared_experts": 1,
                                "model.shared_expert_hidden": 64}) == {
        "model.n_experts": 64, "model.expert_hidden": 32, "model.top_k": 6}
    assert fixed_compute(base, {"granularity": 1, "model.balance": "bias"}) == {}
    with pytest.raises(ConfigError, match="granularity=3"):
        fixed_compute(base, {"granularity": 3})
    with pytest.raises(ConfigError, match="shared experts"):
        fixed_compute(base, {"model.n_shared_experts": 2})  # nothing left to route
    assert parse_grid(["granularity=1,4"]) == {"granularity": [1, 4]}
    with pytest.raises(ConfigError, match="granularity"):
        parse_grid(["granularity=0"])


def test_granularity_points_hold_active_ffn_parameters(tmp_path):
    grid = parse_grid(["granularity=1,4", "model.n_shared_experts=0,1"])
    points = make_points(str(ROOT / "configs" / "ablate_routing.yaml"), [], grid, 1, tmp_path)
    assert all(p.error is None for p in points), [p.error for p in points]
    assert all(not any(o.startswith("--granularity") for o in p.overrides) for p in points)
    ffn, total = set(), {}
    for p in points:
        m, c = p.cfg.model, count_params(p.cfg.model)
        ffn.add(c.active_expert_params + c.shared_expert_params)
        total.setdefault(p.values["model.n_shared_experts"], set()).add(
            c.expert_params + c.shared_expert_params)
        # Routed experts keep their total at every granularity: 16 x 128 = 64 x 32 units.
        assert c.expert_params == 2 * 16 * 3 * 64 * 128
        if p.values["model.n_shared_experts"]:
            # The shared expert is not split: one 128-wide SwiGLU in each of the 2 layers at
            # granularity 1 and 4 alike (it used to follow expert_hidden down to 32).
            assert m.shared_hidden_total == 128
            assert c.shared_expert_params == 2 * 3 * 64 * 128
            # It takes one expert's place in the active width: 2 x 128 - 128 = (top_k) x 32.
            assert m.top_k == {1: 1, 4: 4}[p.values["granularity"]]
    assert len(ffn) == 1  # same active FFN parameters at every point
    # ... and the same total FFN parameters at every granularity, with or without the shared one.
    assert all(len(v) == 1 for v in total.values()) and len(total) == 2


# --- layouts through the trainer -------------------------------------------------------------

# expert_hidden < d_model: the combine weights are folded into the experts (and w1 | w3 run
# as one grouped matmul), also under tp and ep.
BASE = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=4",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.ffn_hidden=128", "--model.max_seq_len=32",
        "--model.capacity_factor=1.0", "--data.seq_len=32", "--data.code_max_mb=0.3",
        "--train.batch_size=8", "--train.micro_batch_size=4", "--train.warmup_steps=2",
        "--train.max_steps=3", "--train.decay_steps=4", "--train.eval_every=3",
        "--data.val_windows=8", "--train.sample_tokens=0", "--log.progress=false",
        "--log.log_every=1"]
# Bias balancing with a fast update (so the bias changes the routing within 3 steps), sigmoid
# scores, a tp-sharded shared expert, the sequence-wise loss; MoE in layers 1 and 3 only.
BIAS = ["--model.balance=bias", "--model.bias_update_rate=0.05", "--model.router_score=sigmoid",
        "--model.n_shared_experts=1", "--model.shared_expert_hidden=32",
        "--model.seq_aux_loss_coef=0.01", "--model.moe_every=2"]
EXPERT_CHOICE = ["--model.routing=expert_choice", "--model.balance=none"]
LAYOUTS = {
    "dp2": (2, BIAS, ["--parallel.dp=2"]),
    "ep2": (2, BIAS, ["--parallel.ep=2"]),
    # pp stage 0 holds layer 0 alone: a pipeline rank with no MoE layer
    "tp2_pp2": (4, BIAS, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.pp_layers=[1,3]"]),
    "expert_choice_ep2": (2, EXPERT_CHOICE, ["--parallel.ep=2"]),
}
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "seq_aux_loss", "router_loss", "drop_frac",
        "grad_norm", "router_entropy", "max_over_mean_load", "val_loss")


def _train_rank(rank, world_size, overrides):
    train(load_config(None, overrides))


def _args(tmp, name, variant, extra=()):
    return BASE + variant + [f"--data.cache_dir={tmp / 'cache'}",
                             f"--train.run_dir={tmp / name}", *extra]


def _biases(run_dir, step=3):
    state = full_state(Path(run_dir) / "checkpoints" / f"step_{step:08d}")["model"]
    return {k: v for k, v in state.items() if k.endswith("router.expert_bias")}


def _train_rows(rows, ref):
    val_steps = {r["step"] for r in ref if "val_loss" in r}
    return [r for r in rows if "lm_loss" in r or r["step"] in val_steps]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("routing_layouts")


@pytest.fixture(scope="module")
def reference(workdir):
    cache = {}

    def get(variant):
        key = json.dumps(variant)
        if key not in cache:
            name = f"single_{len(cache)}"
            train(load_config(None, _args(workdir, name, variant)))
            cache[key] = workdir / name
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(workdir, reference, name):
    world, variant, extra = LAYOUTS[name]
    ref_dir = reference(variant)
    ref = read_rows(ref_dir)
    run_ranks(_train_rank, world, _args(workdir, name, variant, extra), timeout_s=300)
    assert_same_rows(ref, _train_rows(read_rows(workdir / name), ref), KEYS, tag=name)
    if variant is BIAS:
        want, got = _biases(ref_dir), _biases(workdir / name)
        assert sorted(want) == ["layers.1.feed_forward.router.expert_bias",
                                "layers.3.feed_forward.router.expert_bias"]
        for k in want:
            assert torch.equal(want[k], got[k]), (name, k)
        # three updates of +-0.05 (or 0) each: the bias moved, in steps of the rate
        b = want["layers.1.feed_forward.router.expert_bias"]
        assert b.abs().max() > 0 and torch.allclose(b / 0.05, (b / 0.05).round(), atol=1e-4)
    else:  # expert choice: every expert exactly full, nothing dropped
        for row in (r for r in ref if "layers" in r):
            for st in row["layers"].values():
                assert len(set(st["kept_per_expert"])) == 1 and st["drop_frac"] == 0


def test_bias_balanced_run_resumes_exactly(workdir, reference):
    """Stopped after step 1 and resumed to step 3: the same losses and biases as unbroken."""
    ref_dir = reference(BIAS)
    args = _args(workdir, "resumed", BIAS)
    train(load_config(None, args + ["--train.max_steps=1"]))
    assert any(torch.count_nonzero(b) for b in _biases(workdir / "resumed", 1).values())
    train(load_config(None, args))
    ref = read_rows(ref_dir)
    assert_same_rows(ref, _train_rows(read_rows(workdir / "resumed"), ref), KEYS, tag="resume")
    want, got = _biases(ref_dir), _biases(workdir / "resumed")
    assert all(torch.equal(want[k], got[k]) for k in want)


# --- the router interface: a new rule is one class -------------------------------------------


class ThresholdRouter(RouterBase):
    """A variable number of experts per token (every expert whose softmax probability reaches
    ``threshold``, weighted by it; dropless): written against the interface only, to show that
    MoE, the statistics and generation take it without a change."""

    name = "threshold"

    def __init__(self, dim, n_experts, threshold):
        super().__init__(dim, n_experts)
        self.threshold = threshold

    def plan(self, x, n_groups, capacity, n_sequences=None):
        logits, _, probs = self.scores(x)
        chosen = (probs >= self.threshold).t().nonzero()  # [M, 2] (expert, token), by expert
        token = chosen[:, 1]
        counts = torch.bincount(chosen[:, 0], minlength=self.n_experts)
        return RoutingPlan(logits=logits, probs=probs, token=token,
                           weight=probs[token, chosen[:, 0]], counts=counts, routed=counts,
                           aux_loss=torch.zeros(()))


def test_a_router_with_variable_experts_per_token_needs_no_change_outside_its_class():
    layer = _moe(capacity_factor=None)
    router = ThresholdRouter(16, 4, threshold=0.22)
    router.gate.weight.data.copy_(layer.router.gate.weight.data * 3)
    layer.router = router
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    flat = x.reshape(-1, 16)
    probs = F.linear(flat, router.gate.weight).softmax(-1)
    per_token = (probs >= 0.22).sum(1)
    assert per_token.min() != per_token.max()  # not vacuous: tokens get different counts
    ref = torch.zeros_like(flat)
    for t in range(12):
        for e in range(4):
            if probs[t, e] >= 0.22:
                ex = layer.experts
                h = F.silu(flat[t] @ ex.w1[e]) * (flat[t] @ ex.w3[e])
                ref[t] += probs[t, e] * (h @ ex.w2[e])
    torch.testing.assert_close(out.reshape(-1, 16), ref, atol=1e-5, rtol=1e-5)
    assert layer.last_stats.kept_per_expert.tolist() == (probs >= 0.22).sum(0).tolist()
    assert layer.last_experts is None
    out.sum().backward()  # the gate learns through the combine weights
    assert router.gate.weight.grad.abs().sum() > 0


def test_generation_asks_the_router_and_takes_a_new_causal_one():
    """Generation, the engine (and so the scheduler and server) refuse a router that is not
    causal, by asking it; a new causal router generates what full forwards give."""
    from moe.inference import Engine
    from moe.inference.generate import generate

    ec = build_model(tiny_model_config(routing="expert_choice", balance="none"), seed=0)
    for entry in (lambda: Engine(ec), lambda: generate(ec, [[1, 2]], max_new_tokens=1)):
        with pytest.raises(ValueError, match="expert_choice is not causal"):
            entry()
    model = build_model(tiny_model_config(capacity_factor=None), seed=0).eval()
    for layer in model.moe_layers():
        new = ThresholdRouter(32, 4, threshold=0.2)
        new.gate.weight.data.copy_(layer.router.gate.weight.data)
        layer.router = new
    out = generate(model, torch.tensor([[1, 5, 9]]), max_new_tokens=5, temperature=0)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()
