"""The transformer (moe/model/transformer.py, attention.py): attention against a hand-written
reference, causality, capacity-group invariance, meta-device build, names, pipeline pruning."""

import copy
import math

import pytest
import torch

import moe.model.router as router_module
from moe.config import ModelConfig
from moe.model import MoE, Transformer, build_model
from moe.model.layers import FeedForward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=32,
                n_experts=4, top_k=2, expert_hidden=32, ffn_hidden=48, init_std=0.1,
                capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                rope_theta=100.0)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def model_for(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


# --- attention ---------------------------------------------------------------------------------


def rotate(x, theta):
    """Rotary embedding written out: pair (i, i + D/2) is rotated by angle pos * theta^(-2i/D).
    x: [B, S, H, D]."""
    b, s, h, d = x.shape
    half = d // 2
    pos = torch.arange(s, dtype=torch.float64)[:, None]
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    ang = (pos * freq)[None, :, None, :]  # [1, S, 1, D/2]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    out = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    return out.to(x.dtype)


def reference_attention(attn, x, n_heads, n_kv_heads, head_dim, theta, kv_repeat="interleave"):
    """softmax(Q K^T / sqrt(d) + causal mask) V per head; K/V head j serves query heads
    j * g .. (j + 1) * g - 1 (g = n_heads / n_kv_heads), i.e. repeat_interleave."""
    b, s, _ = x.shape
    q = (x @ attn.wq.weight.T).view(b, s, n_heads, head_dim)
    k = (x @ attn.wk.weight.T).view(b, s, n_kv_heads, head_dim)
    v = (x @ attn.wv.weight.T).view(b, s, n_kv_heads, head_dim)
    q, k = rotate(q, theta), rotate(k, theta)
    g = n_heads // n_kv_heads
    if kv_repeat == "interleave":
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    else:  # tiled: the WRONG head mapping, to show the test can tell them apart
        k, v = k.repeat(1, 1, g, 1), v.repeat(1, 1, g, 1)
    mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
    heads = []
    for h in range(n_heads):
        scores = q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(head_dim) + mask
        heads.append(scores.softmax(-1) @ v[:, :, h])
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [
    (4, 4, None),  # MHA
    (4, 2, None),  # GQA
    (4, 1, None),  # MQA
    (4, 2, 16),    # GQA with an explicit head_dim != d_model / n_heads
])
def test_attention_matches_hand_written_reference(n_heads, n_kv_heads, head_dim):
    cfg = tiny(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    model = model_for(cfg)
    attn = model.layers["0"].attention
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = attn(x, model.rope_cos[:12], model.rope_sin[:12])
        ref = reference_attention(attn, x, n_heads, n_kv_heads, cfg.head_size, cfg.rope_theta)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        if 1 < n_kv_heads < n_heads:  # the head mapping is pinned down
            tiled = reference_attention(attn, x, n_heads, n_kv_heads, cfg.head_size,
                                        cfg.rope_theta, kv_repeat="tiled")
            assert not torch.allclose(out, tiled, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    # A GQA model equals an MHA model whose wk / wv repeat each K/V head's rows g times.
    gqa = model_for(tiny(n_heads=4, n_kv_heads=2)).eval()
    mha = Transformer(tiny(n_heads=4, n_kv_heads=4)).eval()
    mha.init_weights()
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(mha(tokens), gqa(tokens), atol=1e-5, rtol=1e-5)


# --- causality ---------------------------------------------------------------------------------


def future_changes_past(model, keeps=None, seq_len=16, cut=8, seed=0):
    """Max change of logits at positions < cut when the tokens from cut on are replaced; with
    ``keeps`` (the record_keep fixture) also assert the past tokens' drop decisions agree."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 64, (2, seq_len), generator=g)
    b = a.clone()
    b[:, cut:] = torch.randint(0, 64, (2, seq_len - cut), generator=g)
    if keeps is not None:
        keeps.clear()
    with torch.no_grad():
        la, lb = model(a), model(b)
    if keeps is not None:
        n = len(keeps) // 2
        for ka, kb in zip(keeps[:n], keeps[n:]):
            assert torch.equal(ka.view(2, seq_len, -1)[:, :cut], kb.view(2, seq_len, -1)[:, :cut])
    return (la[:, :cut] - lb[:, :cut]).abs().max().item()


@pytest.fixture
def record_keep(monkeypatch):
    """Record the keep masks plan_capacity returns inside MoE.forward (the token-choice
    router's plan)."""
    calls = []
    real = router_module.plan_capacity

    def spy(*args, **kwargs):
        keep, rank = real(*args, **kwargs)
        calls.append(keep.clone())
        return keep, rank

    monkeypatch.setattr(router_module, "plan_capacity", spy)
    return calls


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("capacity", [0.5, None], ids=["capacity0.5", "dropless"])
def test_causal_with_token_major_policy(record_keep, mode, capacity):
    cfg = tiny(drop_policy="token_major", capacity_factor=capacity, eval_capacity_factor=capacity)
    model = model_for(cfg).train(mode == "train")
    for seed in range(3):
        for cut in (1, 5, 11):
            # Float noise only (kernels may block differently); drop decisions are identical.
            assert future_changes_past(model, record_keep, cut=cut, seed=seed) < 1e-5
    drops = [m.last_stats.drop_frac() for m in model.moe_layers()]
    assert (max(drops) > 0) == (capacity is not None)


def test_probs_policy_with_tight_capacity_is_not_causal():
    """Known behaviour: under drop_policy=probs a later token with a larger combine weight can
    take an earlier token's slot, so future tokens change past logits (so can a later first
    choice under choice_major). Use token_major for causal LM training/eval with capacity
    limits."""
    cfg = tiny(drop_policy="probs", capacity_factor=0.5, eval_capacity_factor=0.5)
    model = model_for(cfg).eval()
    changes = [future_changes_past(model, cut=8, seed=s) for s in range(4)]
    assert max(changes) > 1e-3
    # ... while dropless probs routing is causal (the policy only orders drops).
    dropless = model_for(tiny(drop_policy="probs", capacity_factor=None,
                              eval_capacity_factor=None)).eval()
    assert future_changes_past(dropless, cut=8) < 1e-5


# --- capacity-group invariance -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("policy", ["choice_major", "token_major", "probs"])
def test_sequence_logits_do_not_depend_on_batch_mates(record_keep, mode, policy):
    cfg = tiny(capacity_group_seqs=1, drop_policy=policy, capacity_factor=1.0,
               eval_capacity_factor=1.0)
    model = model_for(cfg).train(mode == "train")
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model(batch)
    keep_together = [k.view(4, 16, 2) for k in record_keep]
    assert any(not bool(k.all()) for k in keep_together)  # tokens were dropped
    for i in range(4):
        record_keep.clear()
        with torch.no_grad():
            alone = model(batch[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)
        for layer_keep_alone, layer_keep_together in zip(record_keep, keep_together):
            assert torch.equal(layer_keep_alone.view(16, 2), layer_keep_together[i])
    # Reordering the batch permutes the logits and nothing else.
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(batch[perm]), together[perm], atol=1e-5, rtol=1e-5)


def test_two_sequence_groups_couple_batch_mates():
    """capacity_group_seqs=2: the two sequences of a group share each expert's slots, so the
    second sequence's logits depend on the first (token_major: the first queues first)."""
    cfg = tiny(capacity_group_seqs=2, capacity_factor=0.5, eval_capacity_factor=0.5,
               drop_policy="token_major")
    model = model_for(cfg).eval()
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 64, (1, 16), generator=g)
    diffs = []
    for _ in range(4):
        mates = torch.randint(0, 64, (2, 16), generator=g)
        with torch.no_grad():
            l1 = model(torch.cat([mates[:1], a]))[1]
            l2 = model(torch.cat([mates[1:], a]))[1]
        diffs.append((l1 - l2).abs().max().item())
    assert max(diffs) > 1e-3
    # Sequence `a` first in its group queues ahead of its mate: unaffected.
    with torch.no_grad():
        l1 = model(torch.cat([a, mates[:1]]))[0]
        l2 = model(torch.cat([a, mates[1:]]))[0]
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)


# --- construction, names, tying ----------------------------------------------------------------


def test_meta_build_then_to_empty_and_init():
    # Untied; the tied case is test_meta_build_documented_path_keeps_tied_embeddings.
    cfg = tiny(tie_embeddings=False, moe_every=2, n_layers=2)
    direct = model_for(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes == {n: p.shape for n, p in direct.named_parameters()}
    assert list(model.state_dict()) == list(direct.state_dict())
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), n
        else:
            assert 0.2 * cfg.init_std / math.sqrt(8) < p.std() < 1.5 * cfg.init_std, n
    torch.testing.assert_close(model.rope_cos, direct.rope_cos, rtol=0, atol=0)
    assert model.rope_cos.device.type == "cpu"
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))).all()


def test_meta_build_documented_path_keeps_tied_embeddings():
    cfg = tiny(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.isfinite(model.output.weight).all()


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = model_for(tiny(tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert len(list(tied.parameters())) == len(list(tied.state_dict())) - 1
    tied(torch.randint(0, 64, (1, 8))).sum().backward()
    assert tied.tok_embeddings.weight.grad is tied.output.weight.grad
    untied = model_for(tiny(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)


def expected_keys(cfg) -> list[str]:
    """The module names documented in transformer.py's docstring."""
    keys = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        keys += [p + "attention_norm.weight"] + [p + f"attention.{w}.weight"
                                                 for w in ("wq", "wk", "wv", "wo")]
        keys.append(p + "ffn_norm.weight")
        ws = ("w1", "w2", "w3") if cfg.activation == "swiglu" else ("w1", "w2")
        if cfg.is_moe_layer(i):
            keys += [p + "feed_forward.router.gate.weight"]
            keys += [p + f"feed_forward.experts.{w}" for w in ws]
        else:
            keys += [p + f"feed_forward.{w}.weight" for w in ws]
    return keys + ["norm.weight", "output.weight"]


@pytest.mark.parametrize("kw", [dict(), dict(moe_every=2, n_layers=4), dict(activation="gelu"),
                                dict(tie_embeddings=True)])
def test_state_dict_keys_match_documented_names(kw):
    cfg = tiny(**kw)
    sd = model_for(cfg).state_dict()
    assert sorted(sd) == sorted(expected_keys(cfg))
    assert "rope_cos" not in sd  # rotary tables are recomputed, not checkpointed
    d, h, e = cfg.d_model, cfg.expert_hidden, cfg.n_experts
    moe_layer = next(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))
    p = f"layers.{moe_layer}.feed_forward."
    assert sd[p + "router.gate.weight"].shape == (e, d)
    assert sd[p + "experts.w1"].shape == (e, d, h)
    assert sd[p + "experts.w2"].shape == (e, h, d)
    assert sd["layers.0.attention.wk.weight"].shape == (cfg.n_kv_heads * cfg.head_size, d)
    assert sd["output.weight"].shape == (cfg.vocab_size, d)


def test_moe_every_two_alternates_dense_and_moe():
    cfg = tiny(moe_every=2, n_layers=4)
    model = model_for(cfg)
    kinds = [type(model.layers[str(i)].feed_forward) for i in range(4)]
    assert kinds == [FeedForward, MoE, FeedForward, MoE]
    assert model.layers["1"].feed_forward is model.moe_layers()[0]
    assert [m.layer_weight for m in model.moe_layers()] == [0.5, 0.5]
    dense = model.layers["0"].feed_forward
    assert dense.w1.weight.shape == (cfg.ffn_hidden, cfg.d_model)
    model.set_loss_scale(0.25)
    assert all(m.loss_scale == 0.25 for m in model.moe_layers())
    assert [type(model_for(tiny(moe_every=3, n_layers=4)).layers[str(i)].feed_forward)
            for i in range(4)] == [FeedForward, FeedForward, MoE, FeedForward]


def test_sequence_longer_than_max_seq_len_raises():
    model = model_for(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 64, (1, 9)))


# --- pipeline-stage pruning --------------------------------------------------------------------


def test_pruned_stages_compose_to_the_full_model():
    cfg = tiny(n_layers=4, moe_every=2)
    full = model_for(cfg).eval()
    tokens = torch.randint(0, 64, (2, 12))
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    for i in ("2", "3"):
        del first.layers[i]
    first.norm = first.output = None
    for i in ("0", "1"):
        del last.layers[i]
    last.tok_embeddings = None
    assert set(last.state_dict()) <= set(full.state_dict())  # names are kept
    assert "layers.2.attention.wq.weight" in last.state_dict()
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 12, cfg.d_model)
        # The first stage's output is the full model's hidden state after layer 1.
        h = full.tok_embeddings(tokens)
        for i in ("0", "1"):
            h = full.layers[i](h, full.rope_cos[:12], full.rope_sin[:12])
        torch.testing.assert_close(hidden, h, rtol=0, atol=0)
        torch.testing.assert_close(last(hidden), full(tokens), atol=1e-6, rtol=1e-6)
    assert len(last.moe_layers()) == 1 and last.moe_layers()[0].layer_weight == 0.5
    # Pruned stages can be (re-)initialised too.
    last.init_weights()
    first.init_weights()


@pytest.mark.slow
def test_compiled_model_gives_eager_gradients_router_losses_included():
    # Traced, InjectLossGrad's gradient was lost: the router gate's gradient was off by ~100%
    # while the loss matched. fp32 on CPU: expert_impl auto must pick a kernel compile traces.
    from moe.model.loss import lm_loss

    cfg = tiny(n_layers=1, aux_loss_coef=0.1, z_loss_coef=0.01, expert_impl="auto")
    model = build_model(cfg, seed=0)
    x, y = torch.randint(0, cfg.vocab_size, (2, 8)), torch.randint(0, cfg.vocab_size, (2, 8))
    grads = []
    for fwd in (model, torch.compile(model, backend="aot_eager")):  # no codegen: seconds
        model.zero_grad()
        lm_loss(fwd(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_fp32_experts_do_not_recompile_per_routing():
    # Traced in fp32 the experts took the loop, whose per-expert row counts (counts.tolist())
    # made dynamo recompile for every new routing until its recompile limit; they run eagerly
    # now (GroupedExperts.forward), so batches that route differently reuse the graphs.
    from torch._dynamo.utils import counters

    from moe.model.loss import lm_loss

    torch._dynamo.reset()
    cfg = tiny(n_layers=1, n_experts=16, expert_impl="auto")  # ~2 rows an expert: 0s and 1s
    model = build_model(cfg, seed=0)
    compiled = torch.compile(model, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)

    def step():
        x, y = (torch.randint(0, cfg.vocab_size, (2, 8), generator=gen) for _ in range(2))
        lm_loss(compiled(x), y).backward()

    for _ in range(2):  # first compile, then dynamic shapes for the kept-assignment count
        step()
    frames = counters["frames"]["ok"]
    counts = []
    for _ in range(4):
        step()
        counts.append(tuple(model.moe_layers()[0].last_stats.kept_per_expert.tolist()))
    assert len(set(counts)) > 1  # the routing did change from batch to batch
    assert counters["frames"]["ok"] == frames  # and nothing was compiled again
