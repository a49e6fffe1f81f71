"""Serving in bf16 (moe/inference/weights.py): weights bf16, routers and buffers fp32; the
KV cache follows the weights; cached decoding equals the same bf16 model's full forward to
bf16 rounding; greedy agrees with fp32 on a peaked model; moe-serve --dtype bf16 serves it."""

import pytest
import torch

from moe.inference import Engine, SamplingParams
from moe.inference.weights import cast_for_serving, weight_bytes
from moe.model.router import RouterBase
from tests.helpers import dropless_model, tiny_run_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


make_model = dropless_model


def test_bf16_keeps_routers_and_buffers_in_fp32():
    model = make_model(n_layers=2)
    fp32_bytes = weight_bytes(model)
    cos = model.rope_cos.clone()
    cast_for_serving(model, "bf16")
    routers = {n for n, m in model.named_modules() if isinstance(m, RouterBase)}
    assert routers
    for name, p in model.named_parameters():
        in_router = any(name.startswith(r + ".") for r in routers)
        assert p.dtype == (torch.float32 if in_router else torch.bfloat16), name
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert torch.equal(model.rope_cos, cos)  # not rounded through bf16
    assert weight_bytes(model) < 0.55 * fp32_bytes
    assert Engine(model, 1).cache.k["0"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="choose one of"):
        cast_for_serving(model, "fp16")


@pytest.mark.parametrize("kv", [1, 4], ids=["mqa", "mha"])
def test_bf16_cached_decoding_equals_its_full_forward(kv):
    model = cast_for_serving(make_model(n_kv_heads=kv, n_layers=3, moe_every=2), "bf16")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 20),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).float()
    engine = Engine(model, n_slots=2)
    chunks = [engine.forward([0, 1], tokens[:, :7]), engine.forward([0, 1], tokens[:, 7:10])]
    chunks += [engine.decode([0, 1], tokens[:, i])[:, None] for i in range(10, 20)]
    cached = torch.cat(chunks, 1).float()
    # bf16 keeps 8 bits of mantissa: the two orders of summation differ by a few ulps of
    # logits whose scale is ~1-5. The argmax agrees wherever it is not a near-tie.
    torch.testing.assert_close(cached, full, atol=6e-2, rtol=2e-2)
    top2 = full.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1
    assert clear.float().mean() > 0.5
    assert torch.equal(cached.argmax(-1)[clear], full.argmax(-1)[clear])


def test_bf16_greedy_follows_fp32_and_the_router_sees_fp32_logits():
    fp32 = make_model(n_layers=2)
    bf16 = cast_for_serving(make_model(n_layers=2), "bf16")
    prompts = [[1, 2, 3, 4], [7, 7, 9], [30, 5]]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    a = Engine(fp32, 3).generate(prompts, params)
    b = Engine(bf16, 3).generate(prompts, params)
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert agree >= 0.75 * 24, (a, b)  # peaked logits: near-ties are rare
    seen = []
    router = next(m for m in bf16.modules() if isinstance(m, RouterBase))
    hook = router.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype))
    with torch.no_grad():
        bf16(torch.tensor([[1, 2, 3]]))
    hook.remove()
    assert seen == [torch.float32]


def test_serve_takes_dtype(tmp_path, monkeypatch):
    import uvicorn

    from moe.cli import serve

    run = tiny_run_folder(tmp_path / "run")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert serve.main(["--run", str(run), "--dtype", "bf16"]) == 0
    model = seen["app"].state.server.engine.model
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'fp8'"
        serve.main(["--run", str(run), "--dtype", "fp8"])
