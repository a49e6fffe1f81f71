"""Export to Hugging Face MixtralForCausalLM gives the same logits (moe/hf/export.py)."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from moe.config import ModelConfig  # noqa: E402
from moe.hf.export import ExportError, export_hf, to_mixtral, to_mixtral_model  # noqa: E402
from moe.model import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=32,
                rope_theta=500.0, norm_eps=1e-6, n_experts=4, top_k=2, expert_hidden=48,
                capacity_factor=None, eval_capacity_factor=None, init_std=0.1)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def randomise_norms(model):
    """init_weights sets norms to one, which would hide a swapped norm in the mapping."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))


def our_and_hf_logits(cfg, attn="eager", seed=0, tokens=None):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    randomise_norms(model)
    hf = to_mixtral_model(model, attn_implementation=attn)
    if tokens is None:
        tokens = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
    return model, hf, ours, theirs


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_mixtral(n_kv_heads, attn):
    cfg = tiny_cfg(n_kv_heads=n_kv_heads)
    _, hf, ours, theirs = our_and_hf_logits(cfg, attn=attn)
    assert hf.config._attn_implementation == attn
    assert ours.shape == theirs.shape == (3, 16, cfg.vocab_size)
    assert ours.abs().max() > 0.1  # not a vacuous comparison of near-zero logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_head_dim_export():
    # head_dim set explicitly (not d_model / n_heads) and tied input/output embeddings.
    cfg = tiny_cfg(tie_embeddings=True, head_dim=16, n_heads=4, n_kv_heads=2)
    model, hf, ours, theirs = our_and_hf_logits(cfg, seed=1)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_state_dict_matches_installed_layout():
    cfg = tiny_cfg(n_kv_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    hf_cfg, sd = to_mixtral(model)
    assert hf_cfg.num_local_experts == 4 and hf_cfg.num_experts_per_tok == 2
    assert hf_cfg.num_key_value_heads == 2 and hf_cfg.head_dim == 8
    skeleton = transformers.MixtralForCausalLM(hf_cfg).state_dict()
    assert set(sd) == set(skeleton)
    for k, v in sd.items():
        assert v.shape == skeleton[k].shape, k
    # One expert, spelled out: Mixtral's gate/up/down for expert 2 of layer 1.
    exp = model.layers["1"].feed_forward.experts
    if "model.layers.1.mlp.experts.gate_up_proj" in sd:  # transformers >= 5: fused experts
        gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"][2]
        torch.testing.assert_close(gate_up[:48], exp.w1[2].detach().T, rtol=0, atol=0)
        torch.testing.assert_close(gate_up[48:], exp.w3[2].detach().T, rtol=0, atol=0)
        torch.testing.assert_close(sd["model.layers.1.mlp.experts.down_proj"][2],
                                   exp.w2[2].detach().T, rtol=0, atol=0)
    else:  # transformers 4.x: one nn.Linear per expert
        pre = "model.layers.1.block_sparse_moe.experts.2."
        torch.testing.assert_close(sd[pre + "w1.weight"], exp.w1[2].detach().T, rtol=0, atol=0)
        torch.testing.assert_close(sd[pre + "w2.weight"], exp.w2[2].detach().T, rtol=0, atol=0)
        torch.testing.assert_close(sd[pre + "w3.weight"], exp.w3[2].detach().T, rtol=0, atol=0)
    # Copies, not views of the training weights.
    assert sd["model.embed_tokens.weight"].data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_export_hf_save_and_reload(tmp_path):
    cfg = tiny_cfg(n_kv_heads=2)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    randomise_norms(model)
    out = export_hf(model, tmp_path / "hf")
    assert (out / "config.json").is_file()
    hf = transformers.MixtralForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, key", [(dict(moe_every=2), "moe_every"),
                                      (dict(activation="gelu"), "activation")])
def test_unexportable_configs_raise(bad, key):
    cfg = tiny_cfg(**bad)
    torch.manual_seed(0)
    model = build_model(cfg)
    with pytest.raises(ExportError, match=key):
        to_mixtral(model)


def test_pruned_pipeline_stage_raises():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    del model.layers["0"]
    model.tok_embeddings = None
    with pytest.raises(ExportError, match="pipeline stage"):
        to_mixtral(model)


def test_capacity_limited_model_exports_with_warning_and_matches_when_nothing_dropped():
    # Eval capacity ample enough that nothing drops on this input: identical logits, but the
    # export warns that HF Mixtral is dropless.
    cfg = tiny_cfg(capacity_factor=1.0, eval_capacity_factor=4.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with pytest.warns(UserWarning, match="dropless"):
        hf = to_mixtral_model(model, attn_implementation="eager")
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(tokens)
        assert all(m.last_stats.drop_frac() == 0 for m in model.moe_layers())
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)
        # With a tight eval capacity tokens drop and the logits differ: the documented caveat.
        for m in model.moe_layers():
            m.eval_capacity_factor = 0.25
            m.min_capacity = 0
        tight = model(tokens)
        assert any(m.last_stats.drop_frac() > 0 for m in model.moe_layers())
        assert not torch.allclose(hf(input_ids=tokens).logits, tight, atol=1e-4)
