"""Process start-up: the process group from torchrun's environment, and the device mesh."""

from __future__ import annotations

import os

import torch

from moe.config import Config, ConfigError
from moe.parallel.mesh import ParallelDims


def init_distributed(cfg: Config, *, training: bool = True, script: str = "scripts/train.py"):
    """Initialise the process group from torchrun's environment and build the mesh.

    ``training=False`` (inference) checks only what the model split needs
    (``ParallelDims.validate_layout``), not the training batch; ``script`` is the command the
    "launch with torchrun" error names.

    Returns (dims, device); ``dims.mesh()`` is the device mesh. Without torchrun (no RANK in
    the environment) and all sizes 1, returns (dims, None) with no mesh: single-process.
    Under torchrun a process group is always made, one rank included: ``torchrun
    --nproc_per_node=1`` runs the distributed path (NCCL on a GPU) exactly as a larger job
    would, only with every size 1.
    """
    from datetime import timedelta

    import torch.distributed as dist
    dims = ParallelDims.from_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ or dist.is_initialized()
    if not launched and dims.world_size == 1:
        return dims, None
    if not launched:
        raise ConfigError(f"{dims.describe()} needs {dims.world_size} processes: launch with "
                          f"torchrun --nproc_per_node={dims.world_size} {script} ...")
    if training:
        dims.validate(cfg, world)
    else:
        dims.validate_layout(cfg, world)
    backend = cfg.parallel.backend
    from moe.device import resolve_device  # cuda without a GPU: a config error, not gloo

    use_cuda = resolve_device(cfg.train.device).type == "cuda"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.backend=nccl needs a CUDA GPU, and this machine has "
                              "none: use parallel.backend=gloo (or auto)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        store = _restart_scoped_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=world, timeout=timeout)
    dims.build_mesh(device.type)
    return dims, device


def _restart_scoped_store(timeout):
    """torchrun's own key-value store, with this restart round's keys kept apart; None when
    torchrun does not share its store (or no torchrun): ``env://`` then makes a fresh one.

    The agent keeps ONE store for the whole job and hands it to every restart round (torch
    2.13 creates it on the first rendezvous only). Without a per-round prefix a restarted
    round reads the dead round's keys (gloo's peer addresses, NCCL's unique id) under the same
    names, connects to ports nobody listens on, and hangs in ``connectFullMesh`` until the
    process-group timeout (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` is the
    same for all workers of one agent, so this is exact on one node (``--standalone``); with
    several nodes agents can count restarts differently: there, export
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` before torchrun (a new store each round).
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"moe/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            store)
