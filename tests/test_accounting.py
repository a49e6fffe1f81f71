"""moe.accounting.params and scripts/count_params.py: counts true to the model, GPT-4 config on
target."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe.accounting.params import (
    account,
    analytic_params,
    classify_param,
    count_model_params,
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
)
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
    # The imported families' options (moe/hf/import_hf.py).
    "olmoe_projection_qk_norm": dict(n_kv_heads=3, qk_norm="projection"),
    "qwen3_head_qk_norm_dense_layers": dict(n_kv_heads=2, qk_norm="head", dense_layers=[0]),
    "qwen2_bias_gated_shared": dict(n_kv_heads=2, qkv_bias=True, n_shared_experts=1,
                                    shared_expert_hidden=24, shared_expert_gate=True),
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
             + meta.dense_ffn_params + meta.embedding_params + meta.norm_params
             + meta.shared_expert_params)
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


@pytest.mark.slow
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
    # int8 weight-only serving at tp8 x pp16: half the bytes; the reports' "< 15 GB per GPU".
    fp16, int8 = out["serving"][0], out["serving_int8"][0]
    assert int8["weight_bytes_per_gpu"] * 2 == fp16["weight_bytes_per_gpu"]
    assert int8["weight_bytes_per_gpu"] < 15e9 < fp16["weight_bytes_per_gpu"]
    assert int8["max_batch"] > fp16["max_batch"]


def test_overrides_change_counts():
    full = account(load_config(GPT4).model, seq_len=8192).params
    eight = account(load_config(GPT4, ["--model.n_experts=8"]).model, seq_len=8192).params
    assert eight.expert_params * 2 == full.expert_params
    # Top-2 of 8 experts = top-2 of 16 per token; only the router shrinks (8 logits, not 16).
    assert eight.active_params == full.active_params - full.router_params // 2


@pytest.mark.slow
def test_script_table_with_override():
    r = _run("--config", str(GPT4), "--model.n_experts=8")
    assert r.returncode == 0, r.stderr
    assert "8 experts (top-2)" in r.stdout and "GFLOP" in r.stdout and "KiB" in r.stdout
    assert "921B" in r.stdout  # 1.78T - 8 experts of 107.9B


@pytest.mark.parametrize("args,key", [
    (["--model.top_k=99"], "model.top_k"),
    (["--model.bogus=1"], "model.bogus"),
])
@pytest.mark.slow
def test_script_config_error_exits_2(args, key):
    r = _run("--config", str(GPT4), *args)
    assert r.returncode == 2
    assert r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], r.stderr


# ---------------------------------------------------------------------------------------------
# Per-GPU layout (layout_accounting): exact values on a small model, cross-checked against the
# trainer's own sharding code, and the GPT-4 config at tp 8 x pp 16 against the reports.

from moe.accounting.layout import (  # noqa: E402
    ADAM_BYTES_PER_PARAM,
    layout_accounting,
    params_per_rank,
    stage_layers,
)
from moe.config import Config, ConfigError  # noqa: E402
from moe.parallel.mesh import ParallelDims  # noqa: E402

A100_CONFIGS = ["a100x8_tp2pp2dp2", "a100x8_tp8"]


def layout_cfg(model=None, batch_size=16, micro_batch_size=1, **parallel) -> Config:
    """A small Config (SMALL model, overrides in ``model``) with the given parallel sizes."""
    cfg = Config(model=small(**(model or {})))
    cfg.data.seq_len = cfg.model.max_seq_len
    cfg.train.batch_size, cfg.train.micro_batch_size = batch_size, micro_batch_size
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg.validate()


def _layer(d, hd, h_local, kv_local, experts_local, hidden_local, n_experts):
    """Hand count of one MoE layer on one rank: attention, experts, router, 2 norms."""
    attn = 2 * d * h_local * hd + 2 * d * kv_local * hd
    return attn, experts_local * 3 * d * hidden_local, d * n_experts, 2 * d


def test_tp2_mqa_exact():
    cfg = layout_cfg(tp=2)  # 6 heads of 8, MQA, 4 experts of hidden 40, 3 layers, vocab 97
    lay = layout_accounting(cfg)
    assert lay.valid and lay.warnings == ()
    d, hd, v = 48, 8, 97
    attn, exp, router, norms = _layer(d, hd, h_local=3, kv_local=1, experts_local=4,
                                      hidden_local=20, n_experts=4)
    assert attn == 24 * 48 + 48 * 24 + 8 * 48 + 8 * 48  # wq rows halved, K/V replicated
    cat = lay.params_per_gpu_by_category
    assert cat["attention"] == 3 * attn and cat["expert"] == 3 * exp
    assert cat["router"] == 3 * router and cat["norm"] == 3 * norms + d
    assert cat["embedding"] == 2 * v * d  # embedding and head replicated over tp
    assert lay.params_per_gpu == 3 * (attn + exp + router + norms) + d + 2 * v * d == 54000
    assert (lay.rank, lay.params_per_gpu_min) == (0, 54000)  # both tp ranks alike
    # MQA: each tp rank keeps the full KV cache of its layers.
    assert lay.kv_replicated_over_tp
    assert lay.kv_cache_bytes_per_token_per_gpu == kv_cache_bytes_per_token(cfg.model) == 96
    assert lay.weight_bytes_per_gpu == 2 * 54000 and lay.grad_bytes_per_gpu == 2 * 54000
    assert lay.optimizer_bytes_per_gpu == lay.optimizer_bytes_per_gpu_zero1 == 12 * 54000
    # A node holding both tp ranks holds the whole model once.
    assert lay.params_per_node == count_params(cfg.model).total_params


def test_tp2_gqa_splits_kv():
    cfg = layout_cfg(model=dict(n_kv_heads=2), tp=2)
    lay = layout_accounting(cfg)
    attn, *_ = _layer(48, 8, h_local=3, kv_local=1, experts_local=4, hidden_local=20,
                      n_experts=4)
    assert lay.params_per_gpu_by_category["attention"] == 3 * attn
    assert not lay.kv_replicated_over_tp
    assert 2 * lay.kv_cache_bytes_per_token_per_gpu == kv_cache_bytes_per_token(cfg.model)


def test_ep2_halves_experts_and_zero1():
    cfg = layout_cfg(ep=2, dp=2, dp_shard="zero1")
    lay = layout_accounting(cfg)
    full = count_params(cfg.model)
    assert lay.expert_params_per_gpu == full.expert_params // 2 == 3 * 2 * 3 * 48 * 40
    dense = full.total_params - full.expert_params
    assert lay.params_per_gpu == dense + full.expert_params // 2
    # ZeRO-1: dense state over dp * ep = 4 ranks, expert state over dp = 2.
    assert lay.optimizer_bytes_per_gpu == lay.optimizer_bytes_per_gpu_zero1 == (
        ADAM_BYTES_PER_PARAM * (-(-dense // 4) + full.expert_params // 4))
    assert lay.optimizer_bytes_per_gpu_no_zero1 == 12 * lay.params_per_gpu
    assert lay.train_state_bytes_per_gpu == 4 * lay.params_per_gpu + lay.optimizer_bytes_per_gpu
    # FSDP: weights, gradients and AdamW state all sharded that way (16 B per parameter).
    share = -(-dense // 4) + full.expert_params // 4
    assert lay.params_per_gpu_sharded == share
    assert lay.train_state_bytes_per_gpu_fsdp == 16 * share
    cfg.parallel.dp_shard = "fsdp"
    fsdp = layout_accounting(cfg)
    assert fsdp.params_per_gpu == lay.params_per_gpu  # what the rank computes with
    assert fsdp.weight_bytes_per_gpu == fsdp.grad_bytes_per_gpu == 2 * share
    assert fsdp.optimizer_bytes_per_gpu == 12 * share
    assert fsdp.train_state_bytes_per_gpu == fsdp.train_state_bytes_per_gpu_fsdp == 16 * share
    # Ranks: ((pp*dp + dp_i)*ep + ep_i)*tp + tp_i; node of 2 = the two ep ranks of one replica.
    assert layout_accounting(cfg, gpus_per_node=2).params_per_node == full.total_params
    assert layout_accounting(cfg, gpus_per_node=1).params_per_node == lay.params_per_gpu


def test_pp2_splits_layers():
    cfg = layout_cfg(pp=2)  # 3 layers: remainder to the later stage
    m = cfg.model
    assert stage_layers(m, cfg.parallel) == [(0,), (1, 2)]
    per = params_per_rank(cfg)
    full = count_params(m)
    layer = (full.total_params - full.embedding_params - m.d_model) // 3
    emb = m.vocab_size * m.d_model
    assert sum(per[(0, 0, 0)].values()) == emb + layer
    assert sum(per[(1, 0, 0)].values()) == 2 * layer + m.d_model + emb
    lay = layout_accounting(cfg)
    assert (lay.rank, lay.rank_layers, lay.rank_has_head, lay.rank_has_embedding) == (
        1, (1, 2), True, False)
    assert lay.kv_cache_bytes_per_token_per_gpu == 2 * 2 * 1 * 8 * 2  # 2 layers here
    assert lay.params_per_gpu_by_stage == (emb + layer, 2 * layer + m.d_model + emb)
    # Explicit pp_layers; a node of one GPU per stage, and a node of both.
    cfg2 = layout_cfg(pp=2, pp_layers=[2, 1])
    assert stage_layers(m, cfg2.parallel) == [(0, 1), (2,)]
    lay2 = layout_accounting(cfg2, gpus_per_node=1)
    assert (lay2.rank, lay2.params_per_gpu) == (0, emb + 2 * layer)
    assert lay2.params_per_node + lay2.params_per_node_min == full.total_params
    assert layout_accounting(cfg2).params_per_node == full.total_params


def test_interleaved_stages_round_robin():
    cfg = layout_cfg(model=dict(n_layers=5), pp=2, pp_schedule="interleaved_1f1b",
                     pp_stages_per_rank=2)
    # 4 virtual stages of 1, 1, 2, 1 layers; rank r holds stages r and r + 2.
    assert stage_layers(cfg.model, cfg.parallel) == [(0, 2, 3), (1, 4)]
    lay = layout_accounting(cfg)
    assert lay.rank == 0 and not lay.rank_has_head and lay.rank_layers == (0, 2, 3)


@pytest.mark.parametrize("cfg_kw", [
    dict(tp=2),
    dict(model=dict(n_kv_heads=2), tp=2, ep=2),
    dict(model=dict(n_kv_heads=6), tp=2, pp=2, ep=2, dp=2),
    dict(model=dict(moe_every=2, n_layers=4, n_kv_heads=2), tp=2, pp=2),
    dict(model=dict(n_layers=4), pp=2, tp=2, pp_schedule="interleaved_1f1b"),
    dict(pp=3),
    dict(model=dict(n_layers=4), pp=2, pp_layers=[3, 1], ep=4),
], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items() if k != "model"))
def test_counts_match_trainer_sharding(cfg_kw):
    """Every rank's count equals the parameters the trainer's own pipeline / tensor / expert
    code leaves on that rank (applied on the meta device with a stand-in 1-D mesh)."""
    import moe.parallel.pipeline as pipeline
    from moe.parallel.expert import apply_expert_parallel
    from moe.parallel.tensor import apply_tensor_parallel
    from tests.helpers import FakeMesh as Mesh1D

    cfg = layout_cfg(**cfg_kw)
    p = cfg.parallel
    ParallelDims.from_config(cfg).validate(cfg, p.world_size)
    expected = params_per_rank(cfg)
    assert list(expected) == [(s, e, t) for s in range(p.pp) for e in range(p.ep)
                              for t in range(p.tp)]
    for (s, e, t), by_cat in expected.items():
        got = dict.fromkeys(by_cat, 0)
        for _, part in pipeline.build_stage_models(_meta_model(cfg.model), s, p.pp, cfg):
            apply_tensor_parallel(part, Mesh1D(p.tp, t))
            apply_expert_parallel(part, Mesh1D(p.ep, e))
            for name, prm in part.named_parameters():
                got[classify_param(name)] += prm.numel()
        assert got == by_cat, (s, e, t)


@pytest.mark.parametrize("n_layers, pp, sched, v, pp_layers, want", [
    # 10 layers on 4 stages: 2, 3, 3, 2 (the remainder on the middle stages)
    (10, 4, "1f1b", 2, None, [(0, 1), (2, 3, 4), (5, 6, 7), (8, 9)]),
    # 9 layers on 2 ranks x 3 virtual stages: sizes 1, 1, 2, 2, 2, 1 (extra in the middle);
    # rank 0 holds stages 0, 2, 4 = [0], [2, 3], [6, 7]; rank 1 stages 1, 3, 5 = [1], [4, 5], [8]
    (9, 2, "interleaved_1f1b", 3, None, [(0, 2, 3, 6, 7), (1, 4, 5, 8)]),
    (6, 3, "gpipe", 2, [1, 2, 3], [(0,), (1, 2), (3, 4, 5)]),
    (5, 2, "gpipe", 2, None, [(0, 1), (2, 3, 4)]),  # one extra layer: the later stage
])
def test_stage_split_by_hand(n_layers, pp, sched, v, pp_layers, want):
    """The layout's per-rank layers, written out by hand, and the pipeline module's own
    stages (the trainer's) hold exactly those layers."""
    from moe.parallel import pipeline

    cfg = layout_cfg(model=dict(n_layers=n_layers), pp=pp, pp_schedule=sched,
                     pp_stages_per_rank=v, pp_layers=pp_layers, batch_size=64)
    assert stage_layers(cfg.model, cfg.parallel) == want
    for r in range(pp):
        held = [int(k) for _, part in pipeline.build_stage_models(_meta_model(cfg.model), r, pp,
                                                                  cfg) for k in part.layers]
        assert tuple(held) == want[r]


def test_layout_validation():
    # Batch settings that do not fit the pipeline: a warning, counts unchanged.
    # (A micro-batch count below pp is chosen for the user now; one set explicitly is not.)
    bad_batch = layout_accounting(layout_cfg(tp=2, pp=2, pp_microbatches=1))
    good = layout_accounting(layout_cfg(tp=2, pp=2))
    assert good.valid and not bad_batch.valid
    assert len(bad_batch.warnings) == 1 and bad_batch.warnings[0].startswith("batch settings")
    assert bad_batch.params_per_gpu == good.params_per_gpu
    # Heads that do not divide over tp: counted unevenly (6 heads over 4: 2, 2, 1, 1).
    cfg = layout_cfg(tp=4, model=dict(expert_hidden=48))
    lay = layout_accounting(cfg)
    assert not lay.valid and "n_heads=6" in lay.warnings[0]
    attn, *_ = _layer(48, 8, h_local=2, kv_local=1, experts_local=4, hidden_local=12,
                      n_experts=4)
    assert lay.rank == 0 and lay.params_per_gpu_by_category["attention"] == 3 * attn
    with pytest.raises(ConfigError, match="n_heads"):
        layout_accounting(cfg, strict=True)
    with pytest.raises(ConfigError, match="pp_layers"):
        layout_accounting(layout_cfg(pp=2, pp_layers=[1, 1]))
    with pytest.raises(ConfigError, match="fewer than"):
        layout_accounting(layout_cfg(pp=4))
    with pytest.raises(ConfigError, match="tie_embeddings"):
        layout_accounting(layout_cfg(model=dict(tie_embeddings=True), pp=3))


def test_single_gpu_layout_is_the_whole_model():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    lay = layout_accounting(cfg)
    total = count_params(cfg.model).total_params
    assert lay.valid and lay.world_size == lay.n_nodes == 1
    assert lay.params_per_gpu == lay.params_per_node == total
    assert lay.kv_cache_bytes_per_token_per_gpu == kv_cache_bytes_per_token(cfg.model)


@pytest.fixture(scope="module")
def gpt4_tp8_pp16():
    cfg = load_config(GPT4, ["--parallel.tp=8", "--parallel.pp=16"])
    return cfg, layout_accounting(cfg)


def test_gpt4_tp8_pp16_on_target(gpt4_tp8_pp16):
    cfg, lay = gpt4_tp8_pp16
    m = cfg.model
    total = count_params(m).total_params
    assert lay.valid  # 120 heads split over tp=8
    # Default split: the embedding and head stages are the light ones.
    assert [len(x) for x in lay.stage_layers] == [7] * 4 + [8] * 8 + [7] * 4
    # Most loaded GPU: the first 8-layer stage (no embedding, no head).
    assert (lay.rank, lay.rank_coords["pp"], lay.rank_coords["tp"]) == (32, 4, 0)
    assert not lay.rank_has_head and lay.rank_layers == tuple(range(28, 36))
    assert 14.5e9 < lay.params_per_gpu < 15.2e9
    assert lay.weight_bytes_per_gpu == 2 * lay.params_per_gpu < 30e9  # the reports: < 30 GB
    last = lay.params_per_gpu_by_stage[15]  # 7 layers + the replicated 1.5B output head
    assert 2 * last < 30e9 and 2 * lay.params_per_gpu_by_stage[0] < 30e9
    # Per node (8 GPUs = one tp group = one stage): 104B (7 layers) to 119B (8 layers).
    assert lay.n_nodes == 16 and lay.node == 4 and lay.node_pp_stages == (4,)
    assert 110e9 <= lay.params_per_node <= 130e9
    assert 100e9 <= lay.params_per_node_min <= total / 16 <= lay.params_per_node
    assert abs(total / 16 / 111.3e9 - 1) < 0.01  # 1.78T over 16 stages
    # KV: 8 layers x the one MQA K/V head, replicated over the 8 tp ranks.
    assert lay.kv_replicated_over_tp
    assert lay.kv_cache_bytes_per_token_per_gpu == 2 * 8 * 1 * 128 * 2 == 4096
    assert lay.kv_cache_bytes_per_token_per_gpu * 120 == 8 * kv_cache_bytes_per_token(m)
    # AdamW state: 12 B/param; dp = 1 so ZeRO-1 has nothing to shard over.
    assert lay.optimizer_bytes_per_gpu_no_zero1 == lay.optimizer_bytes_per_gpu_zero1 == (
        12 * lay.params_per_gpu)


def test_gpt4_balanced_stages_under_30gb():
    """Giving the embedding and head stages 7 layers keeps every GPU under 30 GB of fp16
    weights (the reports' figure); with dp 4 and zero1 the AdamW state shrinks 4x."""
    layers = "[" + ",".join(map(str, [7] * 7 + [8] * 8 + [7])) + "]"
    cfg = load_config(GPT4, ["--parallel.tp=8", "--parallel.pp=16", "--parallel.dp=4",
                             "--parallel.dp_shard=zero1", "--train.batch_size=64",
                             f"--parallel.pp_layers={layers}"])
    lay = layout_accounting(cfg)
    assert lay.weight_bytes_per_gpu < 30e9
    assert 110e9 <= lay.params_per_node <= 130e9
    assert lay.optimizer_bytes_per_gpu == lay.optimizer_bytes_per_gpu_zero1 == (
        12 * -(-lay.params_per_gpu // 4))


def test_gpt4_with_118_heads_is_counted_but_flagged():
    """118 heads (d 15104) cannot split over tp=8: counted unevenly, with a warning."""
    cfg = load_config(GPT4, ["--parallel.tp=8", "--parallel.pp=16", "--model.n_heads=118",
                             "--model.d_model=15104"])
    lay = layout_accounting(cfg)
    assert not lay.valid and "n_heads=118" in lay.warnings[0]
    assert 110e9 <= lay.params_per_node <= 130e9


@pytest.mark.slow
def test_script_layout_json():
    r = _run("--config", str(GPT4), "--parallel.tp=8", "--parallel.pp=16", "--json")
    assert r.returncode == 0, r.stderr
    assert "warning:" not in r.stderr
    out = json.loads(r.stdout)
    for key in ("params_per_gpu", "params_per_node", "weight_bytes_per_gpu",
                "optimizer_bytes_per_gpu", "optimizer_bytes_per_gpu_zero1",
                "optimizer_bytes_per_gpu_no_zero1", "grad_bytes_per_gpu",
                "train_state_bytes_per_gpu_fsdp",
                "kv_cache_bytes_per_token_per_gpu"):
        assert isinstance(out[key], int), key
    assert 110e9 <= out["params_per_node"] <= 130e9
    assert out["weight_bytes_per_gpu"] == 2 * out["params_per_gpu"]
    assert out["layout"]["rank"] == 32 and out["layout"]["valid"] is True
    assert out["weight_bytes_per_gpu"] < 30e9
    assert out["total_params"] == account(load_config(GPT4).model).params.total_params


@pytest.mark.slow
def test_script_layout_strict_and_table():
    r = _run("--config", str(GPT4), "--parallel.tp=8", "--parallel.pp=16", "--strict",
             "--model.n_heads=118", "--model.d_model=15104")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "n_heads=118" in r.stderr
    r = _run("--config", str(ROOT / "configs" / "a100x8_tp2pp2dp2.yaml"), "--grad-bytes=4")
    assert r.returncode == 0, r.stderr
    for text in ("most loaded GPU", "rank 4 (pp 1", "per node (8 GPUs)", "with zero1", "with fsdp",
                 "gradients (4 B)", "replicated on each of 2 tp ranks"):
        assert text in r.stdout, text


@pytest.mark.parametrize("name", A100_CONFIGS)
def test_a100_node_configs(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    ParallelDims.from_config(cfg).validate(cfg, 8)
    m, t = cfg.model, cfg.train
    assert cfg.parallel.world_size == 8
    assert (m.n_experts, m.top_k, m.n_kv_heads, cfg.data.seq_len) == (16, 2, 1, 2048)
    assert t.dtype == "bf16" and cfg.data.source == "builtin"
    total = count_params(m).total_params
    assert 1e9 <= total <= 2e9
    lay = layout_accounting(cfg, strict=True)
    assert lay.n_nodes == 1 and lay.params_per_node == total
    assert lay.train_state_bytes_per_gpu < 10e9  # far below 80 GB: room for activations
    text = path.read_text()
    assert f"torchrun --nproc_per_node=8 scripts/train.py --config configs/{name}.yaml" in text
    # The header's numbers are the script's.
    assert f"{total:,}" in text and f"{lay.params_per_gpu:,}" in text
