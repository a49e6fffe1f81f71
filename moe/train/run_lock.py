"""One trainer per run folder: an exclusive ``flock`` on ``<train.run_dir>/.lock``.

Two trainers on one ``train.run_dir`` would interleave metrics rows and checkpoints. ``flock``
rather than a pid file: the kernel drops the lock when its holder dies, ``kill -9`` included,
so a crashed run never leaves a lock that the next one has to be told to delete. Under
torchrun only rank 0 takes it (the ranks of one job share the folder by design).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from moe.config import ConfigError

LOCK = ".lock"


def _refuse(run_dir: Path, f) -> None:
    """Try the lock on an open file; a held lock is a one-line ConfigError naming the pid."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        raise ConfigError(f"train.run_dir={run_dir} is in use by another trainer (pid {pid}): "
                          "wait for it to finish, stop it, or use another train.run_dir"
                          ) from None


def check_free(run_dir: Path) -> None:
    """Refuse early, before data is built, when another trainer holds the folder; writes
    nothing (the folder may not exist yet). ``hold`` is what makes it safe."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return
    with open(path) as f:
        _refuse(run_dir, f)  # released when the file closes


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` and hold its lock until the block exits (or the process dies)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:  # a+: the holder's pid stays readable until ours
        _refuse(run_dir, f)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
