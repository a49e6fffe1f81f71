"""Expert implementations (moe/model/experts.py): loop, grouped and bmm agree in forward and
backward, with and without dropping; one expert is the dense FeedForward."""

import copy

import pytest
import torch

from moe.config import ModelConfig
from moe.model import MoE
from moe.model.experts import GroupedExperts, resolve_impl
from moe.model.layers import FeedForward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMPLS = ["loop", "grouped", "bmm"]


def make_experts(activation, seed=0, n_experts=4, dim=16, hidden=24):
    torch.manual_seed(seed)
    ex = GroupedExperts(n_experts, dim, hidden, activation, "loop")
    ex.init_weights(0.3, 0.3)
    return ex


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 4, 0, 6], [0, 0, 0, 7], [0, 0, 0, 0]])
def test_expert_impls_agree_on_ragged_input(activation, counts):
    """GroupedExperts alone, with experts that receive zero rows (first, middle, last, all)."""
    ref_module = make_experts(activation)
    counts_t = torch.tensor(counts)
    m = int(counts_t.sum())
    x0 = torch.randn(m, 16)
    dy = torch.randn(m, 16)
    results = {}
    for impl in IMPLS:
        ex = copy.deepcopy(ref_module)
        ex.impl = impl
        x = x0.clone().requires_grad_()
        y = ex(x, counts_t, capacity=max(counts + [1]))
        (y * dy).sum().backward()
        results[impl] = (y.detach(), x.grad,
                         {n: p.grad if p.grad is not None else torch.zeros_like(p)
                          for n, p in ex.named_parameters()})
    # The loop result by hand: rows of expert e go through expert e.
    start = 0
    for e, c in enumerate(counts):
        xe = x0[start:start + c]
        h = xe @ ref_module.w1[e]
        h = (torch.nn.functional.silu(h) * (xe @ ref_module.w3[e]) if activation == "swiglu"
             else torch.nn.functional.gelu(h))
        torch.testing.assert_close(results["loop"][0][start:start + c],
                                   (h @ ref_module.w2[e]).detach())
        start += c
    y_ref, gx_ref, gw_ref = results["loop"]
    for impl in ("grouped", "bmm"):
        y, gx, gw = results[impl]
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=impl)
        if m:
            torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5, msg=impl)
        for name in gw_ref:
            torch.testing.assert_close(gw[name], gw_ref[name], atol=1e-5, rtol=1e-5,
                                       msg=f"{impl} {name}")
    # An expert without tokens gets an exactly zero weight gradient.
    for e, c in enumerate(counts):
        if c == 0:
            for name, g in gw_ref.items():
                assert torch.equal(g[e], torch.zeros_like(g[e])), (name, e)


def moe_cfg(**kw):
    base = dict(d_model=16, n_experts=4, top_k=2, expert_hidden=24, capacity_factor=1.0,
                eval_capacity_factor=1.0, min_capacity=0, capacity_group_seqs=1,
                aux_loss_coef=0.1, z_loss_coef=0.01, expert_impl="loop")
    base.update(kw)
    return ModelConfig(**base)


def starve_last_expert(layer, x):
    """Gate rows 0..2 read coordinates 0..2 (kept positive), row 3 is zero: expert 3 has logit 0
    while the others have logits >= 2.5, so it is never in the top 2."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:3, :3] = 5 * torch.eye(3)
        x[..., :3] = x[..., :3].abs() + 0.5


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, None], ids=["cf1", "cf0.5", "dropless"])
@pytest.mark.parametrize("starve", [False, True], ids=["all-experts", "idle-expert"])
def test_moe_layer_impls_agree_forward_and_backward(activation, capacity_factor, starve):
    cfg = moe_cfg(activation=activation, capacity_factor=capacity_factor)
    torch.manual_seed(1)
    ref = MoE(cfg)
    ref.init_weights(0.3, 0.3)
    x0 = torch.randn(4, 8, 16)
    if starve:
        starve_last_expert(ref, x0)
    dy = torch.randn(4, 8, 16)
    results = {}
    for impl in IMPLS:
        layer = copy.deepcopy(ref).train()
        layer.experts.impl = impl
        x = x0.clone().requires_grad_()
        y = layer(x)
        (y * dy).sum().backward()
        st = layer.last_stats
        results[impl] = (y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()},
                         st)
    st = results["loop"][3]
    if capacity_factor is None:
        assert st.drop_frac() == 0.0
    else:
        assert st.drop_frac() > 0.0  # dropping is really exercised
    if starve:
        assert st.tokens_per_expert[3] == 0 and st.tokens_per_expert[:3].sum() == 64
    y_ref, gx_ref, gw_ref, _ = results["loop"]
    assert set(gw_ref) == {"router.gate.weight", "experts.w1", "experts.w2"} | (
        {"experts.w3"} if activation == "swiglu" else set())
    for impl in ("grouped", "bmm"):
        y, gx, gw, st_i = results[impl]
        assert torch.equal(st_i.kept_per_expert, st.kept_per_expert)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=impl)
        torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5, msg=impl)
        for name, g in gw_ref.items():
            torch.testing.assert_close(gw[name], g, atol=1e-5, rtol=1e-5, msg=f"{impl} {name}")
    if starve:
        for name in ("experts.w1", "experts.w2"):
            assert torch.equal(gw_ref[name][3], torch.zeros_like(gw_ref[name][3]))
        # The idle expert's gate row still learns, from the router losses' softmax terms.
        assert gw_ref["router.gate.weight"][3].abs().max() > 0


def test_auto_resolves_to_a_real_impl_on_cpu():
    x = torch.randn(2, 4)
    assert resolve_impl("auto", x, 16, 32) == "grouped"
    assert resolve_impl("loop", x, 16, 32) == "loop"
    # grouped matmul needs 16-byte rows: fp32 multiples of 4, bf16 of 8. auto falls back to
    # the loop (never the padded bmm, whose dropless buffer is E x the activations).
    assert resolve_impl("auto", x, 16, 6) == "loop"
    assert resolve_impl("auto", x.bfloat16(), 16, 12) == "loop"
    assert resolve_impl("auto", x.bfloat16(), 16, 24) == "grouped"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_impl("auto", x, 16, 12) == "loop"  # autocast decides the dtype
    with pytest.raises(ValueError, match="multiples of 8"):
        resolve_impl("grouped", x.bfloat16(), 16, 12)
    ex = make_experts("swiglu")
    ex.impl = "nope"
    with pytest.raises(ValueError, match="nope"):
        ex(torch.randn(3, 16), torch.tensor([3, 0, 0, 0]), 3)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["eval", "train-no-router-loss"])
def test_single_expert_equals_dense_feed_forward(activation, impl, mode):
    cfg = moe_cfg(n_experts=1, top_k=1, capacity_factor=4.0, eval_capacity_factor=4.0,
                  activation=activation, expert_impl=impl, aux_loss_coef=0.0, z_loss_coef=0.0)
    torch.manual_seed(2)
    layer = MoE(cfg)
    layer.init_weights(0.3, 0.3)
    layer.train(mode != "eval")
    ffn = FeedForward(16, 24, activation)
    with torch.no_grad():
        ffn.w1.weight.copy_(layer.experts.w1[0].T)
        ffn.w2.weight.copy_(layer.experts.w2[0].T)
        if activation == "swiglu":
            ffn.w3.weight.copy_(layer.experts.w3[0].T)
    x0 = torch.randn(3, 8, 16)
    dy = torch.randn(3, 8, 16)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ya, yb = layer(xa), ffn(xb)
    assert layer.last_stats.drop_frac() == 0.0
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w1.grad[0], ffn.w1.weight.grad.T,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w2.grad[0], ffn.w2.weight.grad.T,
                               atol=1e-6, rtol=1e-5)
    if activation == "swiglu":
        torch.testing.assert_close(layer.experts.w3.grad[0], ffn.w3.weight.grad.T,
                                   atol=1e-6, rtol=1e-5)
    # With one expert the combine weight is p / p = 1: the gate receives no gradient.
    g = layer.router.gate.weight.grad
    assert g is None or g.abs().max() < 1e-6


def test_auto_on_misaligned_experts_runs_the_loop_and_matches_it():
    # expert hidden 6: torch._grouped_mm would raise "strides should be multiple of 16 bytes".
    torch.manual_seed(0)
    ex = GroupedExperts(4, 16, 6, "swiglu", "auto")
    ex.init_weights(0.3, 0.3)
    x, counts = torch.randn(7, 16), torch.tensor([3, 0, 4, 0])
    ref = GroupedExperts(4, 16, 6, "swiglu", "loop")
    ref.load_state_dict(ex.state_dict())
    assert torch.equal(ex(x, counts, 4), ref(x, counts, 4))


@pytest.mark.parametrize("overrides, needle", [
    (["--model.expert_impl=grouped", "--train.device=cuda", "--train.dtype=fp32"], "needs bf16"),
    (["--model.expert_impl=grouped", "--train.dtype=bf16", "--model.expert_hidden=36"],
     "multiples of 8"),
    (["--model.expert_impl=grouped", "--model.expert_hidden=48", "--parallel.tp=8",
      "--train.dtype=bf16"], "expert_hidden / parallel.tp = 6"),
    (["--model.expert_impl=grouped", "--model.d_model=66", "--model.n_heads=6",
      "--model.head_dim=12"],
     "multiples of 4"),
])
def test_config_checks_grouped_mm_requirements(overrides, needle):
    from moe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
