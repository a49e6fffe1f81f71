"""Elastic restart: a rank of a real torchrun job is SIGKILLed, the job restarts and finishes.

``torchrun --standalone --nproc_per_node=2 --max-restarts=1`` trains a tiny dp=2 model; once a
checkpoint exists and a few more steps are logged, rank 0's process (it hosts the metrics log)
is found through /proc and killed with SIGKILL at whatever it is doing (a step, a save). The
survivor must notice in seconds, the agent must start a second round, that round must
resume from the latest complete checkpoint, and metrics.jsonl must equal an unbroken run's
row for row (no duplicated or missing steps, the same losses). Before the fix in
``moe.parallel.launch._restart_scoped_store`` the second round hung in gloo's connectFullMesh.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=8", "--train.micro_batch_size=4",
        "--train.warmup_steps=2", "--train.max_steps=16", "--train.decay_steps=16",
        "--train.eval_every=8", "--data.val_windows=8", "--train.ckpt_every=4",
        "--train.sample_tokens=0", "--log.progress=false", "--log.log_every=1",
        "--parallel.dp=2", "--parallel.timeout_s=300"]
KILL_AFTER_CKPT = 8  # kill once checkpoint 8 is complete and step 10 is logged


def _torchrun(tmp: Path, name: str, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "scripts/train.py", *TINY, f"--data.cache_dir={tmp / 'cache'}",
           f"--train.run_dir={tmp / name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing column (the only one that may differ between runs)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def _last_step(run_dir: Path) -> int:
    """The last training step logged so far (read while rank 0 may be writing a line)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line half written
    return max(steps)


def _workers(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the agent's child processes, read from /proc (no psutil needed)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces
            if ppid != agent_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # exited meanwhile
        for var in env:
            if var.startswith(b"RANK="):
                out[int(var[5:])] = int(entry.name)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited, not yet reaped


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_torchrun_rank_killed_restarts_and_matches_unbroken_run(tmp_path):
    # The unbroken reference, same launcher and layout: rows must match exactly.
    with open(tmp_path / "ref.log", "w") as log:
        ref = _torchrun(tmp_path, "ref", log)
        assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    expected = _rows(tmp_path / "ref")

    run = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        job = _torchrun(tmp_path, "killed", log)
        try:
            ckpt = run / "checkpoints" / f"step_{KILL_AFTER_CKPT:08d}" / "extra.pt"
            _wait_for(lambda: ckpt.is_file() and _last_step(run) >= KILL_AFTER_CKPT + 2, 180,
                      f"checkpoint {KILL_AFTER_CKPT}")
            ranks = _workers(job.pid)
            assert sorted(ranks) == [0, 1], ranks
            os.kill(ranks[0], signal.SIGKILL)
            t_kill = time.monotonic()
            # The survivor is blocked in (or soon reaches) a gradient all-reduce with the dead
            # rank: gloo sees the closed connection and the agent stops it, within seconds.
            _wait_for(lambda: not _alive(ranks[1]), 30, "the survivor to stop")
            detected_s = time.monotonic() - t_kill
            _wait_for(lambda: "resuming from" in log_path.read_text(), 90, "the restarted round")
            restart_s = time.monotonic() - t_kill
            rc = job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
    out = log_path.read_text()
    print(f"survivor stopped {detected_s:.1f} s after the kill; "
          f"second round resumed after {restart_s:.1f} s")
    assert rc == 0, out[-4000:]
    assert detected_s < 10, detected_s
    assert "exitcode: -9" in out and "local_rank: 0" in out, out[-4000:]  # the agent saw it
    resumed = [line for line in out.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1, out[-4000:]
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert step >= KILL_AFTER_CKPT and step % 4 == 0, resumed  # the latest complete one
    assert "Connection refused" not in out and "connectFullMesh" not in out, out[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]  # no duplicates, no gaps
    assert rows == expected  # the same losses, norms, routing stats, val losses: exactly
