"""train.on_nonfinite: stop | skip | rollback, on faults injected into a real training run.

Faults: a NaN loss at a chosen training step (``moe.parallel.sharded_model.lm_loss`` patched), and a
finite loss with an inf in one parameter's gradient before the reduction
(``ShardedModel.reduce_and_clip`` patched). Each policy is compared with the run it should equal:
skip = a run whose data never held the offending batch; rollback = a run resumed from the
checkpoint it rolled back to, with the loader advanced past the offending batch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

import moe.parallel.pipeline
import moe.parallel.sharded_model
from moe.checkpoint import full_state, latest_checkpoint
from moe.config import load_config
from moe.data import PackedLoader, prepare_data
from moe.parallel.sharded_model import ShardedModel
from moe.train.loop import train
from moe.train.nonfinite import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=8",
        "--train.warmup_steps=2", "--train.lr=3e-3", "--data.val_windows=16",
        "--train.eval_every=100", "--train.sample_tokens=0", "--log.progress=false",
        "--log.log_every=1", "--train.decay_steps=8"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, TINY + [f"--data.cache_dir={tmp_path.parent / 'nonfinite_cache'}",
                                     f"--train.run_dir={tmp_path / name}", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run_dir):
    return [r for r in _rows(run_dir) if "lm_loss" in r]


def _events(run_dir):
    return [r for r in _rows(run_dir) if r.get("event") == "nonfinite"]


def nan_loss_at(monkeypatch, *calls, module=moe.parallel.sharded_model, name="lm_loss"):
    """The training loss becomes NaN at these training forward calls (1-based; eval and
    no-grad calls are not counted)."""
    orig, seen = getattr(module, name), [0]

    def patched(logits, targets):
        loss = orig(logits, targets)
        if torch.is_grad_enabled():
            seen[0] += 1
            if seen[0] in calls or (calls == ("all",)):
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(module, name, patched)


def inf_grad_at(monkeypatch, *calls):
    """One element of one parameter's gradient becomes inf (before the reduction) at these
    steps; the loss stays finite."""
    orig, seen = ShardedModel.reduce_and_clip, [0]

    def patched(self, max_norm):
        seen[0] += 1
        if seen[0] in calls:
            p = next(p for p in self.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
        return orig(self, max_norm)

    monkeypatch.setattr(ShardedModel, "reduce_and_clip", patched)


def drop_batches_at(monkeypatch, call, n=1):
    """The loader's ``call``-th next_batch first reads and discards ``n`` batches."""
    orig, seen = PackedLoader.next_batch, [0]

    def patched(self, size):
        seen[0] += 1
        if seen[0] == call:
            for _ in range(n):
                orig(self, size)
        return orig(self, size)

    monkeypatch.setattr(PackedLoader, "next_batch", patched)


def _final_state(run_dir):
    return full_state(latest_checkpoint(run_dir))


def _assert_same_training(a_dir, b_dir):
    a, b = _train_rows(a_dir), _train_rows(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for ra, rb in zip(a, b):
        for key in ("tokens", "loss", "grad_norm", "lr", "batch_size", "drop_frac"):
            assert ra[key] == rb[key], (ra["step"], key)
    sa, sb = _final_state(a_dir), _final_state(b_dir)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def _adam_steps(state):
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def without_batch_4(tmp_path_factory):
    """The reference for skip: 8 steps on a data stream with the 4th batch removed."""
    tmp = tmp_path_factory.mktemp("nonfinite_ref")
    cfg = _cfg(tmp, "ref", "--train.max_steps=8")
    with pytest.MonkeyPatch.context() as mp:
        drop_batches_at(mp, 4)
        train(cfg)
    return Path(cfg.train.run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_skip_equals_a_run_that_never_saw_the_batch(tmp_path, monkeypatch, without_batch_4,
                                                    fault, capsys):
    (nan_loss_at if fault == "loss" else inf_grad_at)(monkeypatch, 4)
    cfg = _cfg(tmp_path, "skip", "--train.max_steps=8", "--train.on_nonfinite=skip")
    summary = train(cfg)
    run = Path(cfg.train.run_dir)
    assert summary["step"] == 8 and summary["nonfinite"] == {"skipped": 1, "rolled_back": 0}
    (event,) = _events(run)
    assert event["step"] == 4 and event["action"] == "skip" and event["skipped"] == 1
    if fault == "loss":
        assert event["loss"] != event["loss"]  # NaN
    else:  # the gradient check: a finite loss, an inf gradient, caught before the step
        assert 0 < event["loss"] < 10 and event["grad_norm"] == float("inf")
    err = capsys.readouterr().err
    assert "step 4: " in err and "update skipped (1 skipped in this run)" in err
    # AdamW stepped 8 times, not 9; every logged training loss is finite; the parameters,
    # losses and grad norms are those of a run whose data never held the batch.
    assert _adam_steps(_final_state(run)) == {8.0}
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 100 for r in _train_rows(run))
    _assert_same_training(run, without_batch_4)


@pytest.mark.slow
def test_skip_then_resume_continues_exactly(tmp_path, monkeypatch, without_batch_4):
    nan_loss_at(monkeypatch, 4)
    part = _cfg(tmp_path, "part", "--train.max_steps=6", "--train.on_nonfinite=skip")
    train(part)
    monkeypatch.undo()  # the resumed process never sees the fault again
    summary = train(_cfg(tmp_path, "part", "--train.max_steps=8", "--train.on_nonfinite=skip"))
    assert summary["nonfinite"] == {"skipped": 1, "rolled_back": 0}  # from the checkpoint
    _assert_same_training(part.train.run_dir, without_batch_4)
    assert [e["step"] for e in _events(part.train.run_dir)] == [4]


@pytest.mark.slow
def test_rollback_equals_resume_with_the_loader_advanced(tmp_path, monkeypatch, capsys):
    # Router jitter draws from the global RNG: the rollback must restore it too.
    common = ["--train.max_steps=8", "--train.ckpt_every=3", "--model.router_jitter=0.1"]
    nan_loss_at(monkeypatch, 5)
    cfg = _cfg(tmp_path, "rollback", *common, "--train.on_nonfinite=rollback")
    summary = train(cfg)
    run = Path(cfg.train.run_dir)
    assert summary["step"] == 8 and summary["nonfinite"] == {"skipped": 0, "rolled_back": 1}
    (event,) = _events(run)
    assert event["step"] == 5 and event["action"] == "rollback"
    assert event["to_checkpoint"] == "step_00000003" and event["rolled_back"] == 1
    assert "step 5: loss is nan: rolled back to step_00000003" in capsys.readouterr().err
    monkeypatch.undo()
    # Reference: 3 steps, then resume with batches 4 and 5 (read before the rollback) skipped.
    ref = _cfg(tmp_path, "ref", *common[1:], "--train.max_steps=3")
    train(ref)
    drop_batches_at(monkeypatch, 1, n=2)
    train(_cfg(tmp_path, "ref", *common))
    _assert_same_training(run, ref.train.run_dir)  # one row per step: steps 4, 5 redone once
    assert _adam_steps(_final_state(run)) == {8.0}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["skip_limit", "rollback_no_checkpoint", "rollback_limit"])
def test_give_up_in_one_line(tmp_path, monkeypatch, case):
    if case == "skip_limit":  # every batch from step 3 on is bad: 2 skips, then stop
        nan_loss_at(monkeypatch, *range(3, 40))
        extra, expect = ["--train.on_nonfinite=skip", "--train.max_nonfinite=2"], \
            "step 3: loss is nan: 3 non-finite steps with no progress (train.max_nonfinite=2)"
        actions = ["skip", "skip", "stop"]
    elif case == "rollback_no_checkpoint":
        nan_loss_at(monkeypatch, 2)
        extra, expect = ["--train.on_nonfinite=rollback"], \
            "step 2: loss is nan: no checkpoint to roll back to yet (train.ckpt_every=100)"
        actions = ["stop"]
    else:  # step 3 fails every time it is retried after the rollback to step 2
        inf_grad_at(monkeypatch, 3, 4, 5)
        extra = ["--train.on_nonfinite=rollback", "--train.max_nonfinite=2",
                 "--train.ckpt_every=2"]
        expect = "3 non-finite steps with no progress (train.max_nonfinite=2), giving up, " \
                 "last checkpoint step_00000002 kept"
        actions = ["rollback", "rollback", "stop"]
    cfg = _cfg(tmp_path, "run", "--train.max_steps=8", *extra)
    with pytest.raises(NonFiniteError) as e:
        train(cfg)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert [r["action"] for r in _events(cfg.train.run_dir)] == actions


@pytest.mark.slow
def test_stop_cli_one_line_and_checkpoint_kept(tmp_path):
    """A diverging run (lr 1e30) under the default policy: exit 1, one stderr line."""
    args = ["--train.max_steps=8", "--train.ckpt_every=1", "--train.lr=1e30",
            "--train.warmup_steps=0"]
    cfg = _cfg(tmp_path, "run", *args)
    prepare_data(cfg)  # the data cache exists: its build log is not what this test reads
    run = Path(cfg.train.run_dir)
    cmd = [sys.executable, "scripts/train.py", *TINY, f"--data.cache_dir={cfg.data.cache_dir}",
           f"--train.run_dir={run}", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Beside the data loader's "[data] using cached tokens" note, one line: no traceback.
    lines = [line for line in res.stderr.splitlines()
             if line.strip() and not line.startswith("[data]")]
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1, res.stderr
    (line,) = lines
    assert line.startswith("error: step ") and "stopped (train.on_nonfinite=stop)" in line
    step = int(line.split()[2].rstrip(":"))
    kept = latest_checkpoint(run)
    assert kept.name == f"step_{step - 1:08d}" and f"last checkpoint {kept.name} kept" in line
    (event,) = _events(run)
    assert event["step"] == step and event["action"] == "stop"


def _faults_on_two_ranks(rank, world_size, tmp):
    """dp2, then pp2, with skip: a NaN loss on rank 1 only at the 2nd batch and an inf
    gradient on rank 0 only at the 4th. Returns, per layout, what this rank decided and a
    checksum."""
    import moe.parallel.pipeline as pipeline
    import moe.parallel.sharded_model as runtime

    state = {"step": 0, "runtime": None}
    fb, rc = ShardedModel.forward_backward, ShardedModel.reduce_and_clip

    def forward_backward(self, *args):
        state["step"] += 1
        state["runtime"] = self
        return fb(self, *args)

    def reduce_and_clip(self, max_norm):
        if rank == 0 and state["step"] == 4:
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return rc(self, max_norm)

    def nan_on_rank_1(orig):
        def patched(logits, targets):
            loss = orig(logits, targets)
            return loss * float("nan") if rank == 1 and state["step"] == 2 else loss
        return patched

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardedModel, "forward_backward", forward_backward)
        mp.setattr(ShardedModel, "reduce_and_clip", reduce_and_clip)
        mp.setattr(runtime, "lm_loss", nan_on_rank_1(runtime.lm_loss))
        mp.setattr(pipeline, "lm_loss", nan_on_rank_1(pipeline.lm_loss))
        for layout in ("dp", "pp"):
            state["step"] = 0
            cfg = _cfg(Path(tmp), layout, "--train.max_steps=4", "--train.on_nonfinite=skip",
                       "--train.micro_batch_size=4", f"--parallel.{layout}=2")
            summary = train(cfg)
            params = state["runtime"].parameters()
            out[layout] = (summary["step"], summary["nonfinite"], state["step"],
                           float(sum(p.detach().double().sum() for p in params)))
    return out


@pytest.mark.slow
def test_every_rank_takes_the_same_decision(tmp_path):
    """Under dp2 a fault on one rank reaches the other through the gradient reduction and the
    summed loss; under pp2 stage 0 learns of the last stage's NaN loss from the summed loss
    and stage 1 of stage 0's inf gradient from the global norm. Both ranks skip both steps."""
    prepare_data(_cfg(tmp_path, "x"))
    results = run_ranks(_faults_on_two_ranks, 2, str(tmp_path), timeout_s=200)
    for layout in ("dp", "pp"):
        for rank in (0, 1):
            step, counts, batches, _ = results[rank][layout]
            assert (step, counts, batches) == (4, {"skipped": 2, "rolled_back": 0}, 6), layout
        events = _events(tmp_path / layout)
        assert [(e["step"], e["action"]) for e in events] == [(2, "skip"), (3, "skip")], layout
        assert events[0]["loss"] != events[0]["loss"]  # NaN
        assert events[1]["grad_norm"] == float("inf") and events[1]["loss"] < 10
    # dp replicas stayed identical: both ranks applied the same updates.
    assert results[0]["dp"][3] == results[1]["dp"][3]
