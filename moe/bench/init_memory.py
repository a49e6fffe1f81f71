"""Peak host memory of building a layout's model, per rank (``scripts/init_memory.py``).

Each rank of the config's layout is a spawned CPU process (gloo, file rendezvous) that builds
the model the way the trainer does (meta device, parallelism applied, then only this rank's
shards materialised: ``ShardedModel``) and reports its peak resident set size (``ru_maxrss``), its
parameter bytes and the time the build took. ``--full`` instead measures one process that
materialises the whole model on the CPU, which is what every rank did before the sharded init.
No optimizer, no data: the model's own footprint.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rank(rank: int, world: int, store: str, path: str, overrides: list, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        from moe.config import load_config
        from moe.model import build_model
        from moe.parallel.launch import init_distributed
        from moe.parallel.sharded_model import ShardedModel

        cfg = load_config(path, overrides)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=1800))
        base = _peak_rss_bytes()
        t0 = time.perf_counter()
        dims, _ = init_distributed(cfg)
        runtime = ShardedModel(cfg, build_model(cfg.model, "meta"), dims, torch.device("cpu"))
        seconds = time.perf_counter() - t0
        n = sum(p.numel() for part in runtime.parts for p in part.parameters())
        queue.put((rank, {"params": n, "param_bytes": 4 * n, "peak_rss": _peak_rss_bytes(),
                          "rss_before_build": base, "seconds": seconds}))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report to the parent
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _full(path: str, overrides: list, queue) -> None:
    import torch

    from moe.config import load_config
    from moe.model import build_model

    torch.set_num_threads(1)
    cfg = load_config(path, overrides)
    base = _peak_rss_bytes()
    t0 = time.perf_counter()
    model = build_model(cfg.model, "cpu", seed=cfg.train.seed)
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    queue.put((0, {"params": n, "param_bytes": 4 * n, "peak_rss": _peak_rss_bytes(),
                   "rss_before_build": base, "seconds": seconds}))


def measure(path: str, overrides: list, full: bool = False) -> list[dict]:
    """Per-rank results (one entry with ``full``), as dicts; raises if a rank failed."""
    from moe.config import load_config

    cfg = load_config(path, overrides)
    world = 1 if full else cfg.parallel.world_size
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if full:
            procs = [ctx.Process(target=_full, args=(path, overrides, queue))]
        else:
            procs = [ctx.Process(target=_rank, args=(r, world, store, path, overrides, queue))
                     for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    errors = [f"rank {r}:\n{v['error']}" for r, v in sorted(results.items()) if "error" in v]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
