"""Checkpoint faults: kill -9 at any moment (during saves too), and damaged checkpoints.

A damaged checkpoint is skipped with a one-line warning that names it and the previous good one
is used, by the trainer and by every tool (consolidate, generate, analysis); none usable is a
one-line error (exit 2). Losses after a recovery equal an unbroken run exactly. A folder of the
former single-file format (state.pt) is refused in one line, by the trainer and the tools.
"""

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_problem,
    latest_good_checkpoint,
    list_checkpoints,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from moe.config import load_config
from moe.train.loop import train

ROOT = Path(__file__).resolve().parents[1]

# As tests/test_train.py: seconds-long runs on 2 cores.
TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=8",
        "--train.warmup_steps=5", "--train.lr=3e-3", "--data.val_windows=16",
        "--train.sample_tokens=0", "--log.progress=false", "--log.log_every=1",
        "--train.threads=1"]
COMMON = ["--train.decay_steps=6", "--train.eval_every=3", "--train.ckpt_every=2",
          "--train.keep_checkpoints=3"]


def _args(root: Path, run_dir: Path, *extra) -> list[str]:
    return TINY + COMMON + [f"--data.cache_dir={root / 'cache'}", f"--train.run_dir={run_dir}",
                            *extra]


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl without the timing column (the only one that may differ between runs)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def _script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _truncate(ckpt: Path) -> Path:
    f = sorted(ckpt.glob("*.distcp"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _flip_byte(ckpt: Path) -> None:
    f = sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    """An unbroken 6-step run, and a run stopped at step 4 (checkpoints 2 and 4) to damage."""
    root = tmp_path_factory.mktemp("faults")
    train(load_config(None, _args(root, root / "full", "--train.max_steps=6")))
    train(load_config(None, _args(root, root / "part", "--train.max_steps=4")))
    return root


def _copy(runs: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs / "part", run)
    return run


def test_manifest_lists_every_file(runs):
    ckpt = runs / "part" / "checkpoints" / "step_00000004"
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
    assert {".metadata", "extra.pt"} <= set(files)
    assert checkpoint_problem(ckpt) is None


def test_truncated_latest_falls_back_and_continues_exactly(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    broken = run / "checkpoints" / "step_00000004"
    _truncate(broken)
    train(load_config(None, _args(runs, run, "--train.max_steps=6")))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(broken) in warnings[0] and "__0_0.distcp" in warnings[0]
    assert f"resuming from {run / 'checkpoints' / 'step_00000002'} at step 2" in err
    # From step 2 on, the same losses as the unbroken run; the rows past step 2 were cut first.
    assert _rows(run) == _rows(runs / "full")
    # The broken step was saved again (replaced), and rotation kept the newest three.
    assert [p.name for p in list_checkpoints(run)] == [f"step_0000000{s}" for s in (2, 4, 6)]
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(run))


def test_no_usable_checkpoint_is_one_line_exit_2(runs, tmp_path, capsys, monkeypatch):
    run = _copy(runs, tmp_path)
    _truncate(run / "checkpoints" / "step_00000004")
    _flip_byte(run / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*step_00000004.*"
                                              "step_00000002.*crc32"):
        latest_good_checkpoint(run, say=lambda m: None)
    monkeypatch.setattr(sys, "argv", ["train.py", *_args(runs, run, "--train.max_steps=6")])
    with pytest.raises(SystemExit) as e:
        _script("train").main()
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if not line.startswith("[data]")]
    assert lines[-1].startswith("error: no usable checkpoint in ") and len(lines) == 3, lines
    assert all(line.startswith("warning: skipping broken checkpoint") for line in lines[:2])


def test_tools_skip_a_broken_latest(runs, tmp_path, capsys, monkeypatch):
    run = _copy(runs, tmp_path)
    broken = run / "checkpoints" / "step_00000004"
    _flip_byte(broken)
    good = run / "checkpoints" / "step_00000002"

    out = tmp_path / "m.pt"
    assert _script("consolidate").main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True)["step"] == 2
    loaded = load_model(run)  # the one loader: generate, export and analysis use it
    assert loaded.step == 2 and loaded.checkpoint == good
    assert loaded.tokenizer == run / "tokenizer.json"
    model = loaded.model
    # generate.py: the previous checkpoint's weights (its samples come from them)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--run", str(run), "--tokens", "3"])
    _script("generate").main()
    err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("[data]")]
    assert len(err) == 3 and all(f"skipping broken checkpoint {broken}:" in e for e in err), err
    ref = load_model(good).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    # consolidate.py's file loads the same weights, with no check of the run folder.
    consolidated = load_model(out)
    assert consolidated.step == 2 and consolidated.checkpoint == out
    assert all(torch.equal(a, b) for a, b in zip(consolidated.model.state_dict().values(),
                                                 ref.state_dict().values()))
    assert capsys.readouterr().err == ""

    # A checkpoint named explicitly never falls back: one line, exit 2.
    with pytest.raises(SystemExit) as e:
        _script("consolidate").main(["--checkpoint", str(broken), "--out", str(tmp_path / "b.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {broken} is broken: __0_0.distcp fails its crc32 check: "
                   "the file is damaged"]
    with pytest.raises(CheckpointError, match="is broken"):
        load_model(broken)
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="does not load as a checkpoint file"):
        load_model(tmp_path / "not_a_checkpoint.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing-entry", "deleted"])
def test_broken_manifest(runs, tmp_path, capsys, damage):
    run = _copy(runs, tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    manifest = ckpt / MANIFEST_FILE
    if damage == "garbage":
        manifest.write_text("{not json")
    elif damage == "truncated":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif damage == "missing-entry":
        files = json.loads(manifest.read_text())
        del files["files"][".metadata"]
        manifest.write_text(json.dumps(files))
    else:  # written before manifests existed: loads, with a note, if its files are whole
        manifest.unlink()
        assert resolve_checkpoint(run) == ckpt
        assert capsys.readouterr().err.strip().splitlines() == [
            f"note: {ckpt} has no {MANIFEST_FILE} (saved by an older version): checked against "
            "its DCP metadata only"]
        _truncate(ckpt)  # ... and a truncated one is still caught, by the DCP metadata
    assert resolve_checkpoint(run) == run / "checkpoints" / "step_00000002"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipping broken checkpoint {ckpt}: ")


def test_rotation_keeps_the_last_good_checkpoint(tmp_path):
    def save(step):
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(torch.full((64,), float(step)))
        save_checkpoint(tmp_path, step, model, keep=2)

    def names():
        return [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path)]

    save(1), save(2)
    _truncate(tmp_path / "checkpoints" / "step_00000002")
    save(3)  # the broken 2 holds no place: 1, the good one before 3, is kept
    assert names() == [1, 3]
    _truncate(tmp_path / "checkpoints" / "step_00000003")
    save(2)  # a newer broken checkpoint (left by a fallback) neither counts nor is deleted
    assert names() == [1, 2, 3]


def test_old_single_file_format_is_one_line(runs, tmp_path, capsys, monkeypatch):
    """A run or step folder of the former format (step_*/state.pt) is refused in one line that
    says how to proceed, by the tools and by the trainer (exit 2), never with a traceback."""
    run = tmp_path / "old"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "config": {}, "step": 4}, step / "state.pt")
    for path in (run, step, step / "state.pt"):
        with pytest.raises(CheckpointError, match="old single-file format.*no longer supported"
                                                  ".*consolidate.*or train again") as e:
            load_model(path)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        _script("consolidate").main(["--checkpoint", str(step), "--out", str(tmp_path / "o.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {step} holds a checkpoint in the old "), err
    monkeypatch.setattr(sys, "argv", ["train.py", *_args(runs, run, "--train.max_steps=6")])
    with pytest.raises(SystemExit) as e:
        _script("train").main()
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if not line.startswith("[data]")]
    assert lines == [f"error: {run / 'checkpoints'} holds a checkpoint in the old single-file "
                     f"format (state.pt), which is no longer supported: consolidate it with "
                     f"scripts/consolidate.py from an older version of moe and load the .pt "
                     f"file it writes, or train again"], lines
    assert sorted(p.name for p in step.iterdir()) == ["state.pt"]  # nothing was changed


def _wait_and_kill(proc, run: Path, mode: str, n_rows: int, deadline: float) -> str:
    """SIGKILL ``proc`` during its next checkpoint save (mode "save") or once metrics.jsonl has
    ``n_rows`` rows (mode "step"); says what the kill interrupted."""
    ckpts, metrics = run / "checkpoints", run / "metrics.jsonl"
    stale = set(ckpts.glob(".tmp_step_*")) if ckpts.is_dir() else set()
    while proc.poll() is None and time.monotonic() < deadline:
        if mode == "save":
            tmp = set(ckpts.glob(".tmp_step_*")) if ckpts.is_dir() else set()
            stale &= tmp  # a leftover from the last kill counts only until it is cleared
            if tmp - stale:
                break
        elif metrics.exists() and metrics.read_bytes().count(b"\n") >= n_rows:
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return "finished"
    proc.kill()
    proc.wait()
    return "mid-save" if any(ckpts.glob(".tmp_step_*")) else "between saves"


@pytest.mark.slow
def test_kill9_five_times_then_rerun_equals_unbroken(runs, tmp_path):
    """kill -9 of `python scripts/train.py` five times, three of them during a checkpoint save;
    the same command again finishes with exactly the unbroken run's metrics rows."""
    steps = 14

    def args(name):
        return [*TINY, f"--data.cache_dir={runs / 'cache'}", f"--train.run_dir={tmp_path / name}",
                f"--train.max_steps={steps}", f"--train.decay_steps={steps}",
                "--train.eval_every=5", "--train.ckpt_every=1", "--train.keep_checkpoints=2"]

    def cmd(name):
        return [sys.executable, "scripts/train.py", *args(name)]

    train(load_config(None, args("full")))  # the unbroken run, in this process (same threads)
    run, rng, what = tmp_path / "run", random.Random(0), []
    for mode in ("save", "step", "save", "step", "save"):
        rows = (run / "metrics.jsonl").read_bytes().count(b"\n") if run.exists() else 0
        proc = subprocess.Popen(cmd("run"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        what.append(_wait_and_kill(proc, run, mode, rows + rng.randint(1, 3),
                                   time.monotonic() + 60))
    assert "finished" not in what, what
    assert what.count("mid-save") >= 2, what  # the kills really interrupted saves
    proc = subprocess.run(cmd("run"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr  # a killed save never looks like a checkpoint
    got, want = _rows(run), _rows(tmp_path / "full")
    assert [r["step"] for r in got if "lm_loss" in r] == list(range(1, steps + 1))
    assert got == want
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        f"step_{s:08d}" for s in (steps - 1, steps))


def test_metrics_row_half_written_by_a_kill_is_dropped_on_resume(tmp_path):
    # kill -9 can land inside the write of a metrics.jsonl row: the resumed run drops it.
    from moe.config import Config
    from moe.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLogger(tmp_path, Config(), resume_step=2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    # A broken line in the middle is not a kill: one line naming the file and line.
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        MetricsLogger(tmp_path, Config(), resume_step=2)
