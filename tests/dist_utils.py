"""Run a function on N gloo ranks inside pytest (spawned processes, file-store rendezvous).

    results = run_ranks(fn, 4, arg1, arg2)   # fn(rank, world_size, *args) -> picklable

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK set, one torch thread, and a process group with
a short timeout, so a failure on one rank surfaces as an error instead of a hang.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _entry(rank, world_size, store_path, fn, args, queue, timeout_s):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: int = 120) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, world_size, store, fn, args, queue,
                                                  timeout_s)) for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, []
        for _ in procs:
            try:
                rank, status, value = queue.get(timeout=timeout_s + 60)
            except Exception:  # noqa: BLE001
                errors.append("timed out waiting for a rank")
                break
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
