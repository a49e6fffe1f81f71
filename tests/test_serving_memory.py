"""Serving memory of configs/gpt4.yaml at tp8 x pp16 (moe/accounting/serving.py), by hand."""

from pathlib import Path

from moe.accounting.layout import layout_accounting
from moe.accounting.params import count_params
from moe.accounting.serving import serving_memory
from moe.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_gpt4_batch_fit_and_bytes_per_token_by_hand():
    cfg = load_config(str(ROOT / "configs" / "gpt4.yaml"), [])
    rows = serving_memory(cfg, contexts=(8192, 32768), gpu_bytes=(40 * 10**9, 80 * 10**9))
    assert [(r.context, r.gpu_bytes) for r in rows] == [
        (8192, 40 * 10**9), (8192, 80 * 10**9), (32768, 40 * 10**9), (32768, 80 * 10**9)]
    # The most loaded pp stage holds 8 of 120 layers (7 x 4, 8 x 8, 7 x 4); MQA's one K/V head
    # of 128 is on every tp rank: 2 (k, v) x 8 layers x 1 head x 128 x 2 bytes per token.
    kv = 2 * 8 * 1 * 128 * 2
    assert all(r.kv_bytes_per_token_per_gpu == kv for r in rows)
    c = load_config(str(ROOT / "configs" / "gpt4.yaml"), ["--parallel.tp=8", "--parallel.pp=16",
                                                           "--parallel.dp=1", "--parallel.ep=1"])
    weights = layout_accounting(c).weight_bytes_per_gpu
    active = count_params(cfg.model).active_params
    for r in rows:
        assert r.weight_bytes_per_gpu == weights
        assert r.max_batch == (r.gpu_bytes - weights) // (kv * r.context)
        # batch 1: every active parameter once (2 bytes) + the context's KV over 120 layers
        assert r.bytes_read_per_token == 2 * active + 2 * 120 * 1 * 128 * 2 * r.context
    assert rows[0].max_batch == 306 and rows[3].max_batch == 374  # 40 GB at 8k, 80 GB at 32k
