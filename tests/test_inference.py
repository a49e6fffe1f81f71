"""The KV-cached engine gives the full forward's logits and tokens (moe/inference/).

Cached decoding (prefill, then one token, or a few, per step) against the model's plain
forward of the whole sequence, for multi-query, grouped-query and multi-head attention, MoE
and dense layers, the MoE few-token decode path and its sorted reference path; batched
prompts of different lengths against each prompt alone; the cache's rollback and slots;
``moe.inference.generate.generate`` against the argmax of a full-forward loop.
"""

import pytest
import torch

from moe.inference import Engine, KVCache, SamplingParams
from moe.inference.generate import generate
from moe.model import build_model
from moe.model.moe import MoE
from tests.helpers import tiny_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROPLESS = dict(capacity_factor=None, eval_capacity_factor=None, min_capacity=0)


def make_model(seed: int = 0, **kw):
    """A dropless tiny model in eval mode; init_std 0.2 spreads the logits, so greedy
    comparisons are not decided by float noise between near-equal tokens."""
    cfg = tiny_model_config(**{**DROPLESS, "max_seq_len": 24, "init_std": 0.2, **kw})
    return build_model(cfg, seed=seed).eval()


ATTENTION = {"mqa": 1, "gqa": 2, "mha": 4}


@pytest.mark.parametrize("moe_every", [1, 2], ids=["moe", "moe+dense"])
@pytest.mark.parametrize("kv", list(ATTENTION), ids=list(ATTENTION))
@pytest.mark.parametrize("decode_path", [True, False], ids=["fast", "reference"])
def test_cached_decoding_equals_full_forward(kv, moe_every, decode_path):
    model = make_model(n_kv_heads=ATTENTION[kv], moe_every=moe_every, n_layers=3)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    engine = Engine(model, n_slots=2, decode_path=decode_path)
    chunks = [engine.forward([0, 1], tokens[:, :7])]
    chunks.append(engine.forward([0, 1], tokens[:, 7:10]))  # a few tokens at once (a verify)
    for i in range(10, 20):
        chunks.append(engine.decode([0, 1], tokens[:, i])[:, None])
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    assert engine.cache.lengths == [20, 20]


def test_ragged_prefill_and_decode_equal_each_sequence_alone():
    model = make_model()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 11, 6)]
    engine = Engine(model, n_slots=3)
    first = engine.prefill([0, 1, 2], seqs)  # right-padded to 11
    assert engine.cache.lengths == [3, 11, 6]
    nxt = [5, 9, 17]
    second = engine.decode([0, 1, 2], nxt)
    for b, s in enumerate(seqs):
        with torch.no_grad():
            alone = model(torch.tensor([s + [nxt[b]]]))[0]
        torch.testing.assert_close(first[b], alone[len(s) - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[b], alone[len(s)], atol=1e-5, rtol=1e-5)


def test_slots_subsets_and_rollback():
    """Decode any subset of slots (non-contiguous too); truncate rolls a slot back exactly."""
    model = make_model()
    engine = Engine(model, n_slots=3)
    seq = list(range(1, 13))
    engine.prefill([0, 2], [seq[:5], seq[:8]])
    a = engine.decode([2], [seq[8]])  # slot 2 alone
    b = engine.decode([0, 2], [seq[5], seq[9]])  # slots 0 and 2, not contiguous
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0]
    torch.testing.assert_close(a[0], full[8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[0], full[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[1], full[9], atol=1e-5, rtol=1e-5)
    # Roll slot 2 back over junk drafts, then feed the true tokens: the full forward's logits.
    engine.forward([2], torch.tensor([[7, 7, 7]]))
    engine.truncate(2, 10)
    c = engine.forward([2], torch.tensor([seq[10:12]]))
    torch.testing.assert_close(c[0], full[10:12], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="roll slot 2 back"):
        engine.truncate(2, 13)
    with pytest.raises(ValueError, match="exceed the cache's max_len"):
        engine.forward([2], torch.zeros(1, 13, dtype=torch.long))


def test_few_token_moe_path_equals_sorted_path():
    cfg = tiny_model_config(**DROPLESS, n_experts=8, top_k=2)
    model = build_model(cfg, seed=3).eval()
    layer = model.layers["0"].feed_forward
    assert isinstance(layer, MoE)
    for b in (1, 2, 4):  # b * top_k <= n_experts: the few-token path applies
        x = torch.randn(b, 1, cfg.d_model, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = layer(x, capacity_factor=None)
            ref_experts = layer.last_experts
            fast = layer(x, capacity_factor=None, decode_path=True)
        assert layer.last_stats is None  # the fast path ran (it keeps no statistics)
        assert torch.equal(layer.last_experts, ref_experts)
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    # Too many tokens, training mode or a capacity: the sorted path, with its statistics.
    with torch.no_grad():
        layer(torch.randn(8, 1, cfg.d_model), capacity_factor=None, decode_path=True)
        assert layer.last_stats is not None
        layer(torch.randn(1, 1, cfg.d_model), capacity_factor=1.0, decode_path=True)
        assert layer.last_stats is not None


def test_capacity_at_inference_drops_in_prefill_only():
    """With a capacity factor the prefill equals the model's eval forward at that factor;
    decode steps (one-token groups) never drop."""
    cfg = tiny_model_config(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=0,
                            max_seq_len=24)
    model = build_model(cfg, seed=4).eval()
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eval_logits = model(tokens)
    assert any(m.last_stats.drop_frac() > 0 for m in model.moe_layers())  # it does drop
    engine = Engine(model, capacity_factor=0.5)
    torch.testing.assert_close(engine.forward([0], tokens)[0], eval_logits[0], atol=1e-5,
                               rtol=1e-5)
    engine.decode([0], [3])
    assert all(m.last_stats.drop_frac() == 0 for m in model.moe_layers())
    dropless = Engine(model)  # the default: dropless whatever the config says
    with torch.no_grad():
        ref = model(tokens, capacity_factor=None)
    torch.testing.assert_close(dropless.forward([0], tokens)[0], ref[0], atol=1e-5, rtol=1e-5)


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: argmax of the full forward of the last max_seq_len tokens, per token."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.cfg.max_seq_len:], capacity_factor=None)[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return idx[0, len(prompt):].tolist()


def test_greedy_generate_equals_full_forward_loop_past_the_window():
    model = make_model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    n = 30  # 8 + 30 > max_seq_len = 24: the window slides for the last 14 tokens
    out = generate(model, torch.tensor([prompt]), max_new_tokens=n, temperature=0)
    assert out.shape == (1, len(prompt) + n)
    assert out[0, len(prompt):].tolist() == full_forward_greedy(model, prompt, n)


def test_batched_generation_equals_each_prompt_alone():
    model = make_model(n_kv_heads=2)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (2, 9, 5, 14)]
    batched = generate(model, prompts, max_new_tokens=12, temperature=0)
    for p, out in zip(prompts, batched):
        alone = generate(model, [p], max_new_tokens=12, temperature=0)[0]
        assert out == alone
        assert out[len(p):] == full_forward_greedy(model, p, 12)
    # Sampling: one generator per row draws what the row draws alone.
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    together = Engine(model, n_slots=len(prompts)).generate(prompts, params, gens)
    for i, p in enumerate(prompts):
        alone = Engine(model).generate([p], params, torch.Generator().manual_seed(i))[0]
        assert together[i] == alone


def test_seeded_sampling_is_reproducible():
    model = make_model()
    prompt = torch.tensor([[1, 2, 3]])

    def draw(seed):
        return generate(model, prompt, max_new_tokens=16, temperature=1.5, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_stop_tokens_end_rows_and_pad_with_the_stop_token():
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0)
    stop = free[0][3 + 2]  # row 0's third new token
    out = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=10,
                   temperature=0, stop_tokens=[stop])
    new0 = out[0, 3:].tolist()
    first = new0.index(stop)
    assert first <= 2 and all(t == stop for t in new0[first:])
    lists = generate(model, prompts, max_new_tokens=10, temperature=0, stop_tokens=[stop])
    assert lists[0][-1] == stop and len(lists[0]) == 3 + first + 1


def test_generate_restores_training_mode_and_rejects_bad_input():
    model = make_model().train()
    generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, temperature=0)
    assert model.training
    p = torch.tensor([[1, 2]])
    for kw, match in [(dict(max_new_tokens=-1), "max_new_tokens"),
                      (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
                      (dict(max_new_tokens=2, temperature=float("nan")), "temperature"),
                      (dict(max_new_tokens=2, top_p=0.0), "top_p"),
                      (dict(max_new_tokens=2, top_p=1.5), "top_p"),
                      (dict(max_new_tokens=2, top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=match):
            generate(model, p, **kw)
    too_long = torch.zeros(1, model.cfg.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the context"):
        generate(model, too_long, max_new_tokens=1)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[model.cfg.vocab_size]], max_new_tokens=1)
    generate(model, p, max_new_tokens=2, temperature=0, draft_model=model)  # speculative
    assert model.training  # (tests/test_speculative.py tests the rest)
    assert generate(model, p, max_new_tokens=0).tolist() == p.tolist()


def test_kv_cache_bytes_per_token_mqa_vs_mha():
    mqa, mha = make_model(n_kv_heads=1), make_model(n_kv_heads=4)
    head_dim, layers = mqa.cfg.head_size, mqa.cfg.n_layers
    a, b = KVCache(mqa, n_slots=3), KVCache(mha, n_slots=3)
    assert a.bytes_per_token() == 2 * layers * 1 * head_dim * 4  # K and V, fp32
    assert b.bytes_per_token() == 4 * a.bytes_per_token()
    assert a.k["0"].shape == (3, 1, mqa.cfg.max_seq_len, head_dim)


def test_generate_under_bf16_autocast_runs():
    """The trainer samples under autocast: the cache stores fp32, attention runs in bf16."""
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    assert out.shape == (1, 8)


def test_a_capacity_factor_for_one_call_plans_each_sequence_alone():
    """generate(..., capacity_factor=1.0) on a model with capacity groups of 2 sequences used
    to raise (a batch of 1 is not a whole group): a factor given per call (inference) plans
    each sequence as its own group, so each row gets the tokens it gets alone."""
    model = build_model(tiny_model_config(capacity_group_seqs=2, capacity_factor=1.0,
                                          eval_capacity_factor=1.0), seed=0).eval()
    prompts = [[1, 5, 9, 2], [7, 7, 3], [4, 8, 15, 16, 23]]
    together = generate(model, prompts, max_new_tokens=6, temperature=0, capacity_factor=0.5)
    for p, row in zip(prompts, together):
        assert generate(model, [p], max_new_tokens=6, temperature=0,
                        capacity_factor=0.5)[0] == row
    with torch.no_grad():  # the plan of one sequence alone: a full forward of it, factor 0.5
        x = torch.tensor([prompts[2]])
        ref = model(x, capacity_factor=0.5)
        torch.testing.assert_close(model(torch.cat([x, x]), capacity_factor=0.5)[:1], ref,
                                   rtol=1e-5, atol=1e-6)
