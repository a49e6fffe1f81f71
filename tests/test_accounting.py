"""moe.accounting and scripts/count_params.py: counts true to the model, GPT-4 config on target."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe.accounting import (account, analytic_params, classify_param, count_model_params,
                            count_params, flops_per_token, kv_cache_bytes_per_token)
from moe.config import ModelConfig, load_config
from moe.model import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "count_params.py"
GPT4 = ROOT / "configs" / "gpt4.yaml"

SMALL = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, max_seq_len=32,
             n_experts=4, top_k=2, expert_hidden=40, ffn_hidden=56)

VARIANTS = {
    "mqa_swiglu_untied": dict(n_kv_heads=1),
    "gqa_tied": dict(n_kv_heads=2, tie_embeddings=True),
    "mha_gelu": dict(n_kv_heads=6, activation="gelu"),
    "moe_every2_swiglu": dict(n_kv_heads=3, moe_every=2, n_layers=4),
    "moe_every2_gelu_tied": dict(n_kv_heads=1, moe_every=2, activation="gelu",
                                 tie_embeddings=True),
    "head_dim_override": dict(n_kv_heads=2, head_dim=10, n_experts=8, top_k=1),
    "no_moe_layers": dict(moe_every=5),
}


def small(**kw) -> ModelConfig:
    cfg = ModelConfig(**{**SMALL, **kw})
    cfg.validate()
    return cfg


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_meta_count_equals_analytic(name):
    cfg = small(**VARIANTS[name])
    meta, formula = count_params(cfg, "meta"), analytic_params(cfg)
    assert meta == formula
    parts = (meta.attention_params + meta.expert_params + meta.router_params
             + meta.dense_ffn_params + meta.embedding_params + meta.norm_params)
    assert parts == meta.total_params


def test_analytic_is_not_trivially_equal():
    """The comparison can fail: a formula that misses a tensor is caught."""
    cfg = small(n_kv_heads=2)
    meta = count_params(cfg)
    assert meta.attention_params != analytic_params(small(n_kv_heads=1)).attention_params
    assert meta.total_params == sum(
        p.numel() for p in _meta_model(cfg).parameters())


def _meta_model(cfg):
    from moe.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_materialised_model(tied):
    cfg = small(n_kv_heads=2, tie_embeddings=tied, moe_every=2, n_layers=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert count_params(cfg).total_params == real
    assert count_model_params(model) == count_params(cfg)
    emb = cfg.vocab_size * cfg.d_model
    assert count_params(cfg).embedding_params == (emb if tied else 2 * emb)
    # Every real parameter has a category.
    for name, _ in model.named_parameters():
        classify_param(name)


def test_unknown_parameter_name_raises():
    with pytest.raises(ValueError, match="does not know"):
        classify_param("layers.0.feed_forward.shared_expert.w1")


def test_active_equals_total_when_all_experts_chosen():
    cfg = small(n_experts=3, top_k=3)
    c = count_params(cfg)
    assert c.active_params == c.total_params
    partial = count_params(small(n_experts=4, top_k=1))
    assert partial.active_params == (partial.total_params - partial.expert_params
                                     + partial.expert_params // 4)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_single_expert_matches_dense_model(activation):
    moe = count_params(small(n_experts=1, top_k=1, expert_hidden=40, activation=activation))
    # A dense model: no layer is MoE (moe_every > n_layers), FFN of the same width.
    dense = count_params(small(moe_every=SMALL["n_layers"] + 1, ffn_hidden=40,
                               activation=activation))
    assert dense.expert_params == dense.router_params == 0
    assert moe.expert_params == dense.dense_ffn_params
    # The only extra parameters are the (1-expert) router's: d_model per MoE layer.
    assert moe.router_params == SMALL["n_layers"] * SMALL["d_model"]
    assert moe.active_params == moe.total_params == dense.total_params + moe.router_params


def test_flops_formula_small():
    cfg = small(n_kv_heads=2, moe_every=2, n_layers=4)
    c = count_params(cfg)
    d, v, s, hd = cfg.d_model, cfg.vocab_size, cfg.max_seq_len, cfg.head_size
    matmul = (c.attention_params + c.router_params + c.dense_ffn_params
              + c.expert_params * cfg.top_k // cfg.n_experts + v * d)
    attn_full = 2 * 2 * cfg.n_layers * s * cfg.n_heads * hd
    assert flops_per_token(cfg, c, context=s) == 2 * matmul + attn_full
    assert flops_per_token(cfg, c) == 2 * matmul + attn_full * (s + 1) // (2 * s)
    # Tied embeddings: same FLOPs (the head matmul still runs), fewer parameters.
    tied = small(n_kv_heads=2, moe_every=2, n_layers=4, tie_embeddings=True)
    assert flops_per_token(tied) == flops_per_token(cfg)
    assert count_params(tied).total_params == c.total_params - v * d


def test_kv_cache_mqa_vs_mha():
    cfg = small(n_kv_heads=1)
    mqa = kv_cache_bytes_per_token(cfg)
    assert mqa == 2 * cfg.n_layers * 1 * cfg.head_size * 2
    assert kv_cache_bytes_per_token(small(n_kv_heads=cfg.n_heads)) == cfg.n_heads * mqa
    acc = account(cfg)
    assert acc.kv_cache_bytes_per_token_mha == cfg.n_heads * acc.kv_cache_bytes_per_token
    assert kv_cache_bytes_per_token(cfg, bytes_per_element=4) == 2 * mqa


def test_gpt4_config_on_target():
    cfg = load_config(GPT4)
    m = cfg.model
    assert (m.n_layers, m.n_experts, m.top_k, m.n_kv_heads) == (120, 16, 2, 1)
    assert cfg.data.seq_len == m.max_seq_len == 8192
    assert m.vocab_size >= 100277
    t0 = time.perf_counter()
    acc = account(m, seq_len=cfg.data.seq_len)
    assert time.perf_counter() - t0 < 10, "meta-device build of the GPT-4 config is too slow"
    p = acc.params
    assert p == analytic_params(m)
    assert abs(p.total_params / 1.8e12 - 1) < 0.05, p.total_params
    assert abs(p.active_params / 2.8e11 - 1) < 0.05, p.active_params
    assert abs(acc.flops_per_token / 5.6e11 - 1) < 0.05, acc.flops_per_token
    assert 50e9 <= p.attention_params <= 60e9, p.attention_params
    assert abs(p.params_per_expert / 111e9 - 1) < 0.05, p.params_per_expert
    assert acc.kv_cache_bytes_per_token * m.n_heads == acc.kv_cache_bytes_per_token_mha
    # The attention term is a small share of the FLOPs at this seq_len.
    assert acc.attention_flops_per_token < 0.1 * acc.flops_per_token


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_script_json():
    r = _run("--config", str(GPT4), "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("total_params", "active_params", "attention_params", "flops_per_token",
                "expert_params", "embedding_params", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha"):
        assert isinstance(out[key], int), key
    acc = account(load_config(GPT4).model, seq_len=8192)
    assert out["total_params"] == acc.params.total_params
    assert out["flops_per_token"] == acc.flops_per_token


def test_overrides_change_counts():
    full = account(load_config(GPT4).model, seq_len=8192).params
    eight = account(load_config(GPT4, ["--model.n_experts=8"]).model, seq_len=8192).params
    assert eight.expert_params * 2 == full.expert_params
    # Top-2 of 8 experts = top-2 of 16 per token; only the router shrinks (8 logits, not 16).
    assert eight.active_params == full.active_params - full.router_params // 2


def test_script_table_with_override():
    r = _run("--config", str(GPT4), "--model.n_experts=8")
    assert r.returncode == 0, r.stderr
    assert "8 experts (top-2)" in r.stdout and "GFLOP" in r.stdout and "KiB" in r.stdout
    assert "921B" in r.stdout  # 1.78T - 8 experts of 107.9B


@pytest.mark.parametrize("args,key", [
    (["--model.top_k=99"], "model.top_k"),
    (["--model.bogus=1"], "model.bogus"),
])
def test_script_config_error_exits_2(args, key):
    r = _run("--config", str(GPT4), *args)
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], r.stderr
