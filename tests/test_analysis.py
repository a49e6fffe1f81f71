"""Routing report and batch dependence on a tiny trained run; the batch-invariant group forward."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from moe.analysis import batch_dependence, group_forward
from moe.analysis.batch import served_batch_kl
from moe.analysis.plots import heatmaps, lines_vs_x
from moe.analysis.routing import js_divergence
from moe.checkpoint import load_model
from moe.config import load_config
from moe.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bd_script = _script("batch_dependence")
rr_script = _script("routing_report")

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=8",
        "--train.warmup_steps=5", "--data.val_windows=16", "--train.sample_tokens=0",
        "--log.progress=false"]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG and len(data) > 1000, path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained for 40 steps on the built-in corpus (a few seconds)."""
    from moe.train.loop import train

    tmp = tmp_path_factory.mktemp("analysis")
    cfg = load_config(None, TINY + [f"--data.cache_dir={tmp / 'cache'}",
                                    f"--train.run_dir={tmp / 'run'}", "--train.max_steps=40",
                                    "--train.eval_every=40"])
    train(cfg)
    return tmp / "run"


def _random_model(**kw):
    cfg = load_config(None, TINY + [f"--model.{k}={v}" for k, v in kw.items()])
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


@pytest.mark.parametrize("policy", ["choice_major", "token_major", "probs"])
def test_group_forward_matches_the_batched_model(policy):
    """The batch-invariant per-group evaluation is the model's own forward, up to rounding."""
    model = _random_model(capacity_group_seqs=4, drop_policy=policy, eval_capacity_factor=0.5)
    x = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    dropped = 0.0
    for j in range(8):
        g0 = j // 4 * 4
        mates = torch.cat([x[g0:j], x[j + 1:g0 + 4]])
        logits, keeps = group_forward(model, x[j], mates, j - g0, 0.5)
        torch.testing.assert_close(logits, ref[j], rtol=1e-4, atol=1e-5)
        dropped += sum(1 - k.float().mean() for k in keeps)
    assert dropped > 0  # the comparison covered real drops


def test_batch_dependence_exact_zero_cases_on_a_random_model():
    model = _random_model()
    pool = torch.randint(0, 512, (32, 32), generator=torch.Generator().manual_seed(2))
    res = batch_dependence(model, pool[0], pool[1:], [0.25, None], [1, 4], trials=4)
    by = {(r["capacity_factor"], r["group_size"]): r for r in res}
    for key in [(0.25, 1), (None, 1), (None, 4)]:
        r = by[key]
        assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0 and r["kl_all_positions_mean"] == 0.0
        assert r["top1_agreement"] == 1.0 and r["bit_identical_logits"] == 1.0
    assert by[(None, 4)]["prompt_drop_frac"] == 0.0
    assert by[(0.25, 1)]["prompt_drop_frac"] > 0  # drops on its own, but always the same ones
    assert by[(0.25, 4)]["same_routing_plan"] < 1.0 and by[(0.25, 4)]["kl_max"] > 0.0
    # capacity = ceil(0.25 * 32 tokens * top-2 / 4 experts) = 4 slots, 16 in a group of 4
    # sequences; dropless: every token of the group
    assert by[(0.25, 1)]["capacity"] == 4 and by[(0.25, 4)]["capacity"] == 16
    assert by[(None, 4)]["capacity"] == 4 * 32
    assert not any(r["capacity_is_minimum"] for r in res)
    low = batch_dependence(model, pool[0], pool[1:], [0.05], [1], trials=1)[0]
    assert low["capacity"] == 4 and low["capacity_is_minimum"]  # ceil(0.8) = 1 < 4


def test_served_batch_kl_is_float_noise_dropless_and_positive_with_drops():
    # The model's own batched forward: another prompt's logits, a batch-mate leaking into the
    # prompt or a drop-free capacity would each break one side.
    pool = torch.randint(0, 512, (24, 32), generator=torch.Generator().manual_seed(3))
    kl = {cf: served_batch_kl(_random_model(capacity_group_seqs=4, eval_capacity_factor=cf,
                                            init_std=0.2),
                              pool[:2], pool[2:], draws=3) for cf in ("null", 0.5)}
    assert 0.0 <= kl["null"] <= 1e-9 and kl[0.5] > 1e-6, kl
    with pytest.raises(ValueError, match="batch-mates"):
        served_batch_kl(_random_model(capacity_group_seqs=4), pool[:1], pool[1:3])


@pytest.mark.slow
def test_batch_dependence_tool_on_a_trained_run(run_dir, tmp_path):
    out = tmp_path / "bd"
    rc = bd_script.main(["--run", str(run_dir), "--prompt",
                         "def main(argv=None):\n    parser = argparse.ArgumentParser()\n",
                         "--capacity-factors", "0.25,1.0,null", "--group-sizes", "1,4",
                         "--trials", "4", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "batch_dependence.json").read_text())["results"]
    by = {(r["capacity_factor"], r["group_size"]): r for r in res}
    assert len(by) == 6
    for cf in (0.25, 1.0, None):
        assert by[(cf, 1)]["kl_mean"] == 0.0 and by[(cf, 1)]["kl_max"] == 0.0
        assert by[(cf, 1)]["top1_agreement"] == 1.0
    assert by[(None, 4)]["kl_mean"] == 0.0 and by[(None, 4)]["kl_all_positions_mean"] == 0.0
    assert by[(None, 4)]["top1_agreement_all_positions"] == 1.0
    assert by[(0.25, 4)]["kl_all_positions_mean"] > 0.0
    assert_png(out / "batch_dependence.png")
    md = (out / "batch_dependence.md").read_text()
    assert re.search(r"\| dropless \| 4 \| \d+ \| 0 \| 0 \|", md), md


def test_routing_report_on_a_trained_run(run_dir, tmp_path):
    out = tmp_path / "routing"
    assert rr_script.main(["--run", str(run_dir), "--out", str(out), "--windows", "16"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["sources"]) == {"code", "text"}
    assert set(rep["layers"]) == {"0", "1"}
    for layer in rep["layers"].values():
        assert sum(layer["share"]) == pytest.approx(1.0)
        assert 0.0 <= layer["drop_frac"] <= 1.0
        assert 0.0 < layer["entropy_norm"] <= 1.0 + 1e-6
        assert 0.0 <= layer["js_code_text_bits"] <= 1.0
        for src in ("code", "text"):
            assert sum(layer["per_source"][src]["share"]) == pytest.approx(1.0)
    assert "## Specialisation" in (out / "report.md").read_text()
    for name in ("load", "specialisation", "specialisation_diff", "layers"):
        assert_png(out / f"{name}.png")
    assert load_model(run_dir).step == 40


def test_js_divergence_bounds():
    assert js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)


def test_plot_helpers_write_png(tmp_path):
    assert_png(heatmaps({"a": [[0.1, 0.9], [0.5, 0.5]], "b": [[1.0], [1.0]]}, tmp_path / "h.png"))
    assert_png(lines_vs_x([1.0, None], {"s": {"y": [(1.0, 0.1), None]}}, tmp_path / "l.png",
                          x_key="model.capacity_factor"))
