"""End-to-end training on the built-in corpus: learning, exact resume, accumulation, checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from moe.config import ConfigError, load_config
from moe.optim import batch_size_at, lr_at, micro_batches
from moe.train.loop import train

ROOT = Path(__file__).resolve().parents[1]

# A model small enough for seconds-long runs on 2 cores, on a slice of the stdlib.
TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=8",
        "--train.warmup_steps=5", "--train.lr=3e-3", "--data.val_windows=32",
        "--train.sample_tokens=0", "--log.progress=false", "--log.log_every=1"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}",
                                     f"--train.run_dir={tmp_path / name}", *extra])


def _rows(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_training_learns_and_writes_run_folder(tmp_path):
    cfg = _cfg(tmp_path, "run", "--train.max_steps=60", "--train.eval_every=20",
               "--train.sample_tokens=20")
    summary = train(cfg)
    rows = _rows(cfg.train.run_dir)
    train_rows = [r for r in rows if "lm_loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    for key in ("step", "tokens", "loss", "lm_loss", "aux_loss", "z_loss", "drop_frac", "lr",
                "grad_norm", "tokens_per_s", "layers"):
        assert key in train_rows[0], key
    assert train_rows[-1]["tokens"] == 60 * 8 * 32
    # The logged loss is the LM loss plus the weighted router losses.
    r = train_rows[-1]
    assert r["loss"] == pytest.approx(r["lm_loss"] + r["router_loss"], rel=1e-9)
    assert 0 < r["aux_loss"] < 4 and r["z_loss"] > 0 and 0 <= r["drop_frac"] < 1
    assert set(r["layers"]) == {"0", "1"} and len(r["layers"]["0"]["tokens_per_expert"]) == 4
    # Visibly learns: from ln(512) = 6.24 at init to well below, and val improves at each eval.
    assert train_rows[0]["lm_loss"] > 6.0
    assert sum(r["lm_loss"] for r in train_rows[-10:]) / 10 < train_rows[0]["lm_loss"] - 0.7
    val = [r["val_loss"] for r in val_rows]
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert summary["val_loss"] == val_rows[-1]["val_loss"]
    assert isinstance(summary["sample"], str) and summary["sample"]
    saved = (Path(cfg.train.run_dir) / "config.yaml").read_text()
    assert "n_experts: 4" in saved
    assert latest_checkpoint(cfg.train.run_dir).name == "step_00000060"


@pytest.mark.parametrize("extra", [
    [],
    # jitter draws from the RNG, the ramp changes batch sizes, accumulation splits them
    ["--model.router_jitter=0.1", "--train.batch_ramp_tokens=1024",
     "--train.batch_ramp_start=2", "--train.micro_batch_size=4"],
])
def test_resume_continues_exactly(tmp_path, extra):
    common = ["--train.decay_steps=12", "--train.eval_every=100", "--train.ckpt_every=100", *extra]
    full = _cfg(tmp_path, "full", "--train.max_steps=12", *common)
    train(full)
    part = _cfg(tmp_path, "part", "--train.max_steps=6", *common)
    train(part)
    assert latest_checkpoint(part.train.run_dir).name == "step_00000006"
    train(_cfg(tmp_path, "part", "--train.max_steps=12", *common))
    a, b = ([(r["step"], r["loss"], r["grad_norm"]) for r in _rows(c.train.run_dir)
             if "lm_loss" in r] for c in (full, part))
    assert a == b  # bit-identical on CPU, the resumed half included


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Micro-batching is a layout choice: with per-sequence capacity groups the step is the same."""
    one = _cfg(tmp_path, "one", "--train.max_steps=3", "--model.capacity_factor=1.0")
    four = _cfg(tmp_path, "four", "--train.max_steps=3", "--model.capacity_factor=1.0",
                "--train.micro_batch_size=2")
    train(one)
    train(four)
    ra = [r for r in _rows(one.train.run_dir) if "lm_loss" in r]
    rb = [r for r in _rows(four.train.run_dir) if "lm_loss" in r]
    assert ra[0]["drop_frac"] > 0  # dropping is active
    for x, y in zip(ra, rb):
        for key in ("loss", "aux_loss", "z_loss", "drop_frac", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
        assert x["layers"]["1"]["tokens_per_expert"] == y["layers"]["1"]["tokens_per_expert"]


def test_optimizer_kernels_agree():
    """train.optimizer_impl picks AdamW's kernel, not its maths: fused (the default) and the
    reference for-loop give the same parameters after a few steps, decay groups included."""
    from moe.model import build_model
    from moe.optim import build_optimizer

    cfg = load_config(None, TINY)
    results = []
    for impl in ("fused", "foreach", "for-loop"):
        cfg.train.optimizer_impl = impl
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = build_optimizer(model, cfg.train)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in
                                                  build_model(cfg.model).parameters()]))


def test_changed_model_cannot_resume(tmp_path):
    train(_cfg(tmp_path, "run", "--train.max_steps=2"))
    with pytest.raises(ConfigError, match="model.n_experts"):
        train(_cfg(tmp_path, "run", "--train.max_steps=4", "--model.n_experts=2"))


def test_parallel_sizes_need_distributed_trainer(tmp_path):
    with pytest.raises(ConfigError, match="parallel"):
        train(_cfg(tmp_path, "run", "--parallel.tp=2"))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, [], extra={"x": torch.ones(2)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, [], extra={"x": torch.zeros(2)})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    # Pruning keeps the newest `keep`.
    for s in (2, 3, 4):
        save_checkpoint(tmp_path, s, [], extra={"x": torch.zeros(1)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_schedules():
    cfg = load_config(None, ["--train.lr=1.0", "--train.warmup_steps=10", "--train.max_steps=110",
                             "--train.min_lr_ratio=0.1", "--train.batch_size=64",
                             "--train.micro_batch_size=16", "--train.batch_ramp_tokens=1000",
                             "--train.batch_ramp_start=16"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    # 16 + 48 * tokens / 1000 sequences, in whole increments above the start (default: one
    # capacity group); the layout never enters.
    assert batch_size_at(0, cfg, group_seqs=1) == 16
    assert batch_size_at(500, cfg, group_seqs=1) == 40
    assert batch_size_at(999, cfg, group_seqs=1) == 63
    assert batch_size_at(500, cfg, group_seqs=16) == 32
    assert batch_size_at(1000, cfg, group_seqs=1) == 64
    cfg.batch_ramp_increment = 6
    assert [batch_size_at(t, cfg, group_seqs=1) for t in (0, 124, 125, 500, 999)] == [
        16, 16, 22, 40, 58]
    cfg.batch_ramp_start, cfg.batch_ramp_increment = 3, 0  # start 3, steps of 1
    assert [batch_size_at(t, cfg, group_seqs=1) for t in (0, 16, 17, 500)] == [3, 3, 4, 33]
    assert micro_batches(40, 16) == [16, 16, 8]


@pytest.mark.slow
def test_train_cli_rejects_bad_config_in_one_line():
    out = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/tiny.yaml",
                          "--model.top_k=99"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "model.top_k" in out.stderr
    out = subprocess.run([sys.executable, "scripts/train.py", "--model.n_expert=4"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "model.n_expert" in out.stderr


@pytest.mark.slow
def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _cfg(tmp_path, "run", "--train.max_steps=2", "--log.wandb=offline",
               "--log.wandb_group=sweep")
    train(cfg)
    run_dir = Path(cfg.train.run_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (run_dir / "wandb_id").read_text().strip() in offline[0].name
    assert any(offline[0].rglob("*.wandb"))  # the logged history, to `wandb sync` later


def test_resume_applies_changed_optimizer_settings_and_says_so(tmp_path, capsys):
    from moe.checkpoint import full_state

    train(_cfg(tmp_path, "run", "--train.max_steps=2", "--train.weight_decay=0.1"))
    capsys.readouterr()
    changed = ["--train.weight_decay=0.02", "--train.beta2=0.99", "--train.eps=1e-6"]
    train(_cfg(tmp_path, "run", "--train.max_steps=4", *changed))
    err = capsys.readouterr().err
    for text in ("train.weight_decay: 0.1 -> 0.02", "train.beta2: 0.95 -> 0.99",
                 "train.eps: 1e-08 -> 1e-06"):
        assert text in err
    assert "beta1" not in err  # unchanged settings are not listed
    # The step-4 checkpoint holds what the optimizer used: the new values, and no decay on
    # the no-decay group (norms, embedding).
    saved = full_state(latest_checkpoint(tmp_path / "run"))["optimizer"]["param_groups"]
    groups = {name: dict(hyper) for name, hyper in saved.items()}
    assert groups["layers.0.attention.wq.weight"]["weight_decay"] == 0.02
    assert groups["layers.0.attention.wq.weight"]["betas"] == (0.9, 0.99)
    assert groups["layers.0.attention.wq.weight"]["eps"] == 1e-6
    assert groups["norm.weight"]["weight_decay"] == 0.0


class _FakeWandbRun:
    def __init__(self):
        self.rows, self.finished = [], []

    def log(self, row, step):
        self.rows.append(step)

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


@pytest.mark.parametrize("fail", [False, True])
def test_metrics_logger_and_wandb_closed_even_when_training_raises(tmp_path, monkeypatch, fail):
    import types

    import moe.train.loop

    runs = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: runs.append(_FakeWandbRun()) or runs[-1]))
    loggers = []

    class Logger(moe.train.loop.MetricsLogger):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.closes = 0
            loggers.append(self)

        def close(self):
            self.closes += 1
            super().close()

    monkeypatch.setattr(moe.train.loop, "MetricsLogger", Logger)
    if fail:  # the second step raises, after the first was logged
        def lr_at(step, tc):
            if step == 1:
                raise RuntimeError("boom")
            return tc.lr

        monkeypatch.setattr(moe.train.loop, "lr_at", lr_at)
    cfg = _cfg(tmp_path, "run", "--train.max_steps=3", "--log.wandb=offline")
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            train(cfg)
    else:
        train(cfg)
    (logger,) = loggers
    (run,) = runs
    assert logger.closes == 1 and logger.file.closed
    # A run that raised is marked failed in wandb, not finished; either way finished once.
    assert run.finished == ([1] if fail else [None]) and run.rows[0] == 1
    assert [r["step"] for r in _rows(cfg.train.run_dir)][:1] == [1]
    # The run-folder lock went with them: the same folder trains again at once.
    monkeypatch.undo()
    train(_cfg(tmp_path, "run", "--train.max_steps=1", "--train.eval_every=1"))
