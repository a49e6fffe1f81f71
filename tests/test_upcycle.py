"""Sparse upcycling (moe/upcycle/upcycle.py, moe-upcycle): a dense model's feed-forward copied
into every expert, a fresh router; with renormalised top-k weights, no noise and no dropping the
upcycled model's logits are the dense model's, from our dense runs and from Hugging Face Llama
and Qwen2 folders."""

import pytest
import torch

from moe.checkpoint import UPCYCLED, load_model, read_extra
from moe.cli.upcycle import main as upcycle_main
from moe.config import Config, ModelConfig
from moe.hf.import_hf import write_run
from moe.model import build_model
from moe.upcycle import UpcycleError, upcycle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DENSE = dict(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
             ffn_hidden=40, moe_every=4, n_experts=4, top_k=2, expert_hidden=40, init_std=0.1)
EXACT = ["--model.capacity_factor=null", "--model.eval_capacity_factor=null"]


def dense_run(path, seed=7, **kw):
    """Our dense model (random weights, norms off one) saved as a run folder; its seed is not
    the upcycle's, so nothing copied matches by being drawn alike."""
    cfg = ModelConfig(**{**DENSE, **kw})
    cfg.validate()
    model = build_model(cfg, "cpu", seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    config = Config(model=cfg)
    config.data.seq_len = cfg.max_seq_len
    write_run(path, model, config.validate(), {}, lambda run: None)
    return model


def logits(model, seed=0):
    tokens = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("source, target, g", [
    (dict(), ["--model.n_experts=4", "--model.top_k=2"], 1),
    (dict(dense_layers=[0, 1, 2], moe_every=1, tie_embeddings=True, n_kv_heads=1),
     ["--model.n_experts=3", "--model.top_k=1"], 1),
    (dict(activation="gelu", n_kv_heads=4), ["--model.n_experts=8", "--model.top_k=3"], 1),
    # MoE layers of one expert, beside a gated shared expert (copied as it is)
    (dict(moe_every=1, n_experts=1, top_k=1, expert_hidden=24, n_shared_experts=1,
          shared_expert_hidden=16, shared_expert_gate=True),
     ["--model.n_experts=4", "--model.top_k=2"], 1),
    # Granular: 4 copies of 2 slices (top-2 copies); 3 copies of 4 slices (top-1 copy, gelu)
    (dict(), ["--model.n_experts=8", "--model.top_k=4"], 2),
    (dict(activation="gelu"), ["--model.n_experts=12", "--model.top_k=4"], 4),
], ids=["swiglu_gqa_top2", "dense_layers_tied_mqa_top1", "gelu_mha_top3",
        "one_expert_moe_gated_shared", "g2_swiglu_top2_copies", "g4_gelu_top1_copy"])
def test_upcycled_logits_equal_the_dense_models(tmp_path, source, target, g):
    dense = dense_run(tmp_path / "dense", **source)
    out = upcycle(tmp_path / "dense", tmp_path / "up", target + EXACT, granularity=g)
    up = load_model(out)
    m = up.cfg.model
    assert m.n_experts == int(target[0].split("=")[1]) and m.router_weights == "renorm"
    assert m.expert_hidden * g == source.get("expert_hidden", 40)
    assert all(m.is_moe_layer(i) for i in range(m.n_layers))
    assert UPCYCLED in read_extra(up.checkpoint)
    want, got = logits(dense), logits(up.model)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ff = up.model.layers["1"].feed_forward
    assert torch.equal(ff.experts.w1[0], ff.experts.w1[-g])  # slice 0 of the first, last copy
    if g > 1:  # each copy's slices chosen together: whole copies, top_k / g of them per token
        chosen = ff.last_experts // g  # [T, k] the copy of each chosen expert
        assert (chosen.view(-1, m.top_k // g, g) == chosen.view(-1, m.top_k // g, g)[..., :1]).all()
        gate = ff.router.gate.weight
        assert torch.equal(gate[0], gate[g - 1]) and not torch.equal(gate[0], gate[g])


def test_noise_raw_weights_and_the_router(tmp_path):
    dense = dense_run(tmp_path / "dense")
    target = ["--model.n_experts=4", "--model.top_k=2", *EXACT]
    exact = load_model(upcycle(tmp_path / "dense", tmp_path / "a", target, seed=1)).model
    other = load_model(upcycle(tmp_path / "dense", tmp_path / "b", target, seed=2)).model
    gate = exact.layers["0"].feed_forward.router.gate.weight
    assert gate.abs().max() > 0  # a fresh router, drawn from the seed
    assert not torch.equal(gate, other.layers["0"].feed_forward.router.gate.weight)
    want = logits(dense)
    torch.testing.assert_close(logits(other), want, atol=1e-5, rtol=1e-5)  # any router
    noisy = load_model(upcycle(tmp_path / "dense", tmp_path / "n", target, noise=0.05)).model
    experts = noisy.layers["0"].feed_forward.experts
    assert not torch.equal(experts.w1[0], experts.w1[1])
    assert not torch.allclose(logits(noisy), want, atol=1e-3)
    # Raw (unrenormalised) weights sum to less than 1: the FFN's output shrinks.
    raw = load_model(upcycle(tmp_path / "dense", tmp_path / "r",
                             target + ["--model.router_weights=raw"])).model
    assert not torch.allclose(logits(raw), want, atol=1e-3)


@pytest.mark.parametrize("source, target, match", [
    (dict(moe_every=1), ["--model.n_experts=8"], "has 4 experts: upcycle a dense model"),
    (dict(), ["--model.n_experts=1", "--model.top_k=1"], "model.n_experts=1: upcycle to 2"),
    (dict(), ["--model.n_experts=4", "--model.expert_hidden=20"],
     "model.expert_hidden=20: at granularity 1 each expert is 40 of the dense FFN's 40 units"),
    (dict(), ["--model.n_experts=6", "--model.top_k=2", "granularity=4"],
     "model.n_experts=6 is not a multiple of the granularity 4"),
    (dict(), ["--model.n_experts=8", "--model.top_k=3", "granularity=2"],
     "model.top_k=3 is not a multiple of the granularity 2"),
    (dict(), ["--model.n_experts=6", "--model.top_k=3", "granularity=3"],
     "granularity 3 must be a positive divisor of the dense FFN's 40 hidden units"),
])
def test_what_cannot_be_upcycled_is_refused(tmp_path, source, target, match):
    dense_run(tmp_path / "dense", **source)
    g = int(target.pop().split("=")[1]) if target[-1].startswith("granularity") else 1
    with pytest.raises(UpcycleError, match=match):
        upcycle(tmp_path / "dense", tmp_path / "up", target, granularity=g)
    assert not (tmp_path / "up").exists()


def test_cli_and_an_upcycled_run_is_never_resumed(tmp_path, capsys):
    from moe.config import ConfigError, load_config
    from moe.train.loop import train

    dense_run(tmp_path / "dense")
    out = tmp_path / "up"
    assert upcycle_main([str(tmp_path / "dense"), "--out", str(out), "--model.n_experts=4",
                         "--model.top_k=2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds an imported or upcycled model"):
        train(load_config(out / "config.yaml", ["--log.progress=false"]))
    with pytest.raises(SystemExit):
        upcycle_main([str(tmp_path / "dense"), "--out", str(out), "--model.n_experts=4"])
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hugging_face_dense_folders_import_and_upcycle_exactly(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from moe.hf.import_hf import load_hf_model

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
              initializer_range=0.1, tie_word_embeddings=family == "qwen2")
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    ours, cfg = load_hf_model(tmp_path / "hf")  # dense: every layer a dense FFN
    assert cfg.dense_layers == [0, 1] and cfg.qkv_bias == (family == "qwen2")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), want, atol=1e-5, rtol=1e-5)
    out = upcycle(tmp_path / "hf", tmp_path / "up", ["--model.n_experts=4", "--model.top_k=2"])
    up = load_model(out)
    assert up.cfg.model.capacity_factor is None  # dropless, as the import
    with torch.no_grad():
        torch.testing.assert_close(up.model(tokens), want, atol=1e-5, rtol=1e-5)
