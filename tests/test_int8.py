"""Int8 weight-only serving (moe/model/int8.py, moe/inference/weights.py): exact int8 values of
a hand-made matrix; the int8 model equals its readable reference (the fp32 model with weights
rounded to the int8 grid) to float rounding on the decode path, the sorted path and the full
forward; cached decoding equals its own full forward; the gates stay fp32; weight bytes;
moe-serve and moe-generate take --dtype int8."""

import copy

import pytest
import torch

from moe.inference import Engine, SamplingParams
from moe.inference.weights import (
    cast_for_serving,
    int8_targets,
    round_to_int8_grid,
    weight_bytes,
)
from moe.model.int8 import (
    Int8Embedding,
    Int8Experts,
    Int8Linear,
    dequantize,
    quantize_per_channel,
)
from moe.model.router import RouterBase
from tests.helpers import dropless_model, tiny_run_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


make_model = dropless_model


def test_quantize_hand_made_matrix():
    # Scales chosen as powers of two, so every division is exact; torch.round rounds half to
    # even (-3.5 -> -4, 63.5 -> 64).
    w = torch.tensor([[127.0, -3.5, 0.25],     # amax 127: scale 1
                      [0.0, 0.0, 0.0],          # all zero: scale 1, q 0 (no division by 0)
                      [-63.5, 31.75, 1.0]])     # amax 63.5: scale 0.5
    q, scale = quantize_per_channel(w, reduce_dim=-1)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.tolist() == [[127, -4, 0], [0, 0, 0], [-127, 64, 2]]
    assert scale.tolist() == [1.0, 1.0, 0.5]
    back = dequantize(q, scale, -1)
    assert back.tolist() == [[127.0, -4.0, 0.0], [0.0, 0.0, 0.0], [-63.5, 32.0, 1.0]]
    # The experts' layout [E, in, out] reduces over the input axis (-2): a column each.
    q_t, s_t = quantize_per_channel(w.t()[None], reduce_dim=-2)
    assert torch.equal(q_t[0], q.t()) and torch.equal(s_t[0], scale)


def test_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(
        -3, 1, 16)[:, None]  # rows of very different magnitudes: one scale each
    q, scale = quantize_per_channel(w, -1)
    err = (dequantize(q, scale, -1) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(-1) == 127).all()  # each row uses the whole range
    # Per channel: the small rows keep their precision (one scale per matrix would give every
    # row the largest row's step, ~1e4 times the first row's).
    assert err[0].amax() < 1e-3 * err[-1].amax()


def test_int8_layers_replace_every_matrix_but_the_gates():
    model = make_model(n_layers=3, moe_every=2, n_shared_experts=1, shared_expert_gate=True,
                       tie_embeddings=True)
    fp32_bytes = weight_bytes(model)
    targets = [name for name, _ in int8_targets(model)]
    assert "output" in targets and "tok_embeddings" in targets
    assert not any("router" in n or "shared_expert_gate" in n for n in targets)
    cast_for_serving(model, "int8")
    assert isinstance(model.tok_embeddings, Int8Embedding)
    assert isinstance(model.output, Int8Linear)
    assert model.output.weight is model.tok_embeddings.weight  # tied: one int8 table
    moe = model.layers["1"].feed_forward
    assert isinstance(moe.experts, Int8Experts)
    assert isinstance(moe.shared_experts.w1, Int8Linear)
    assert type(moe.shared_expert_gate) is torch.nn.Linear
    assert isinstance(model.layers["0"].feed_forward.w2, Int8Linear)  # dense layer
    for name in ("wq", "wk", "wv", "wo"):
        assert isinstance(getattr(model.layers["2"].attention, name), Int8Linear)
    assert moe.experts.w1.dtype == torch.int8 and moe.experts.w1_scale.shape == (4, 32)
    assert moe.experts.w2_scale.shape == (4, 32)  # [E, dim]: per expert, per output channel
    routers = [m for m in model.modules() if isinstance(m, RouterBase)]
    assert routers and all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # norms, gates
    # int8 values plus fp32 scales, routers and norms: under 0.3x fp32 here; a tied table
    # counted once.
    assert weight_bytes(model) < 0.3 * fp32_bytes
    assert Engine(model, 1).cache.k["0"].dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(n_layers=3, moe_every=2),
                                dict(n_layers=2, n_kv_heads=4, activation="gelu",
                                     qkv_bias=True),
                                dict(n_layers=2, expert_hidden=16, n_shared_experts=1)],
                         ids=["mqa-dense-moe", "mha-gelu-bias", "narrow-shared"])
def test_int8_model_equals_its_dequantised_reference(kw):
    base = make_model(**kw)
    ref = round_to_int8_grid(copy.deepcopy(base))
    q = cast_for_serving(copy.deepcopy(base), "int8")
    tokens = torch.randint(0, base.cfg.vocab_size, (2, 20),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_base, full_ref, full_q = base(tokens), ref(tokens), q(tokens)
    # The reference is a different model from fp32 (the rounding is real) ...
    assert (full_ref - full_base).abs().amax() > 1e-3
    # ... and the int8 model computes it: same weights, scale applied after the matmul.
    torch.testing.assert_close(full_q, full_ref, atol=2e-5, rtol=1e-5)
    # The decode path (Engine, few tokens) and the sorted path (decode_path=False) agree
    # with the reference's own cached decoding.
    for decode_path in (True, False):
        engines = [Engine(m, 2, decode_path=decode_path) for m in (ref, q)]
        outs = []
        for e in engines:
            steps = [e.forward([0, 1], tokens[:, :6])]
            steps += [e.decode([0, 1], tokens[:, i])[:, None] for i in range(6, 20)]
            outs.append(torch.cat(steps, 1))
        torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", [1, 4], ids=["mqa", "mha"])
def test_int8_cached_decoding_equals_its_full_forward(kv):
    model = cast_for_serving(make_model(n_kv_heads=kv, n_layers=3, moe_every=2), "int8")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    engine = Engine(model, n_slots=2)
    chunks = [engine.forward([0, 1], tokens[:, :7]), engine.forward([0, 1], tokens[:, 7:10])]
    chunks += [engine.decode([0, 1], tokens[:, i])[:, None] for i in range(10, 20)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_int8_router_sees_fp32_and_greedy_follows_fp32():
    fp32 = make_model(n_layers=2)
    int8 = cast_for_serving(make_model(n_layers=2), "int8")
    seen = []
    router = next(m for m in int8.modules() if isinstance(m, RouterBase))
    hook = router.register_forward_hook(lambda m, i, out: seen.append(
        (i[0].dtype, router.gate.weight.dtype, out[0].dtype)))
    with torch.no_grad():
        int8(torch.tensor([[1, 2, 3]]))
    hook.remove()
    assert seen == [(torch.float32,) * 3]
    prompts = [[1, 2, 3, 4], [7, 7, 9], [30, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    a = Engine(fp32, 3).generate(prompts, params)
    b = Engine(int8, 3).generate(prompts, params)
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert agree >= 0.75 * 24, (a, b)  # peaked logits (init_std 0.2): near-ties are rare


def test_int8_experts_sorted_path_with_folded_combine():
    # expert_hidden < d_model folds the combine weights into the hidden activation
    # (MoE.fold_combine): Int8Experts.forward takes them as GroupedExperts does.
    base = make_model(n_layers=1, expert_hidden=16)
    moe_ref = round_to_int8_grid(copy.deepcopy(base)).layers["0"].feed_forward
    moe_q = cast_for_serving(copy.deepcopy(base), "int8").layers["0"].feed_forward
    assert moe_q.fold_combine
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe_q(x, capacity_factor=None),
                                   moe_ref(x, capacity_factor=None), atol=1e-5, rtol=1e-5)


def test_dtype_quality_measures_against_fp32():
    from moe.analysis.context import token_losses
    from moe.bench.dtypes import dtype_quality

    model = make_model(n_layers=2)
    windows = torch.randint(0, model.cfg.vocab_size, (6, 17),
                            generator=torch.Generator().manual_seed(4))
    q = dtype_quality(model, windows, ("int8",), batch_size=4)
    assert q["fp32"]["val_loss"] == pytest.approx(
        float(token_losses(model, windows, 6, capacity_factor=None).double().mean()), abs=1e-6)
    e = q["int8"]
    assert e["weight_bytes"] < 0.3 * q["fp32"]["weight_bytes"]
    assert abs(e["val_loss_delta"]) < 0.05 and e["val_loss_delta_se"] > 0
    assert e["val_loss"] == pytest.approx(q["fp32"]["val_loss"] + e["val_loss_delta"])
    assert 0.8 < e["top1_agreement"] <= 1
    assert 0.5 < e["greedy_same_tokens"] <= 1 and 0 < e["greedy_identical_prefix"] <= 8
    assert (q["prompt_tokens"], q["greedy_new_tokens"]) == (8, 8)


def test_export_refuses_an_int8_model():
    from moe.hf.export import ExportError, check_exportable

    model = make_model(n_layers=1)
    check_exportable(model)  # the fp32 model exports
    with pytest.raises(ExportError, match="int8 serving weights"):
        check_exportable(cast_for_serving(model, "int8"))


def test_serve_and_generate_take_int8(tmp_path, monkeypatch, capsys):
    import uvicorn

    from moe.cli import generate, serve

    run = tiny_run_folder(tmp_path / "run")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert serve.main(["--run", str(run), "--dtype", "int8"]) == 0
    model = seen["app"].state.server.engine.model
    assert isinstance(model.layers["0"].feed_forward.experts, Int8Experts)
    assert seen["app"].state.server.engine.cache.k["0"].dtype == torch.float32

    args = ["--run", str(run), "--prompt", "def ", "--max-new-tokens", "6", "--temperature",
            "0", "--ignore-eot"]
    texts, real, models = {}, generate.Engine, []
    monkeypatch.setattr(generate, "Engine", lambda m, **kw: models.append(m) or real(m, **kw))
    for dtype in ("fp32", "int8"):
        assert generate.main([*args, "--dtype", dtype]) == 0
        texts[dtype] = capsys.readouterr().out
    assert [type(m.output).__name__ for m in models] == ["Linear", "Int8Linear"]
    assert texts["int8"].startswith("def ") and len(texts["int8"]) > len("def \n")
    assert generate.main([*args, "--dtype", "int8", "--image", "x.png"]) == 2
    assert "--image captions in fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'int4'"
        generate.main([*args, "--dtype", "int4"])
