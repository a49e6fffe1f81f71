"""Writing a checkpoint so that a crash at any moment leaves the previous one as the latest.

Everything is written into ``.tmp_step_N``; after every rank's DCP files and the metadata are
on disk (fsync'd) rank 0 writes ``extra.pt`` and then ``manifest.json`` (both fsync'd) and
renames the folder to ``step_N``. Only ``step_*`` folders holding ``extra.pt`` count as
checkpoints, so a crash at any point leaves the previous checkpoint as the latest and never a
half-written one that looks complete; the next save deletes the leftover temporary folder.

Measured on torch 2.13 CPU: a job that called ``dcp.save`` sometimes aborts at exit with
``terminate called without an active exception`` after all its work is done (4 of 26 runs on
gloo).
``save_checkpoint`` returns only after the checkpoint is renamed into place, fsync'd, and
every rank has passed a barrier, so such an abort cannot lose or corrupt a checkpoint;
launchers should judge a run by its checkpoints and metrics.jsonl rather than by the exit
status alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moe.checkpoint.integrity import (
    EXTRA_FILE,
    FORMAT,
    _rank,
    _step,
    checkpoint_dir,
    checkpoint_problem,
    is_checkpoint,
    list_checkpoints,
    write_manifest,
)
from moe.checkpoint.sharding import _dcp_quiet, _parts, model_state, optimizer_state


def _barrier(mesh) -> None:
    if mesh is not None:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, parts,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                    mesh=None, keep: int = 2) -> Path:
    """Save this rank's ``parts`` (the model, or the list of stage modules this rank holds
    under pipeline parallelism) and ``optimizer`` as the checkpoint of ``step`` under
    ``<run_dir>/checkpoints``, atomically; keep the newest ``keep``. Returns the folder.

    ``extra`` (loader state, RNG, step, tokens, resolved config dict, ...) is written by rank 0
    only, with the layout sizes added. Collective with a mesh: every rank calls it with its own
    modules and the same step; with ``mesh=None`` it needs no process group.
    """
    parts = _parts(parts)
    state = model_state(parts, mesh)
    if optimizer is not None:
        state.update(optimizer_state(parts, optimizer, mesh))
    return _save_state(run_dir, step, state, extra or {}, mesh, keep)


def _save_state(run_dir: str | Path, step: int, state: dict, extra: dict, mesh=None,
               keep: int = 2) -> Path:
    """Write the flat DCP ``state`` (from model_state / optimizer_state) and ``extra`` as the
    checkpoint of ``step``, atomically; keep the newest ``keep``. Collective with a mesh: every
    rank calls it with its own state and the same step (``extra`` is taken from rank 0)."""
    root = checkpoint_dir(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    main = mesh is None or _rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed save
        for old in root.glob(".old_step_*"):  # a crash mid-swap of a re-saved step
            if is_checkpoint(old) and not (root / old.name[len(".old_"):]).exists():
                os.replace(old, root / old.name[len(".old_"):])
            else:
                shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    _barrier(mesh)
    writer = dcp.FileSystemWriter(tmp, sync_files=True)
    _dcp_quiet(dcp.save, state, storage_writer=writer, no_dist=mesh is None)
    _barrier(mesh)  # every rank's files and the metadata are written and fsync'd

    error = None
    if main:
        try:
            layout = dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else {}
            _finalise(root, tmp, final, {**extra, "step": extra.get("step", step),
                                         "layout": layout, "format": FORMAT}, keep)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if mesh is not None:  # every rank learns whether rank 0 finished, so none waits forever
        flag = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] is not None and error is None:
            raise RuntimeError(f"rank 0 failed to complete checkpoint {final}: {flag[0]}")
    if error is not None:
        raise error
    return final


def _finalise(root: Path, tmp: Path, final: Path, extra: dict, keep: int) -> None:
    with open(tmp / EXTRA_FILE, "wb") as f:
        torch.save(extra, f)
        f.flush()
        os.fsync(f.fileno())
    write_manifest(tmp)  # last: it vouches for every other file
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step: swap, never leave a gap without a checkpoint
        old = root / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _rotate(root, final, keep)


def _rotate(root: Path, new: Path, keep: int) -> None:
    """Keep ``new`` and the newest ``keep - 1`` older checkpoints that pass the size check; a
    broken older one holds no place (so it never pushes out the last good one) and goes.
    Newer ones (left broken when a resume fell back past them) stay until their step is
    saved again, which replaces them."""
    if keep <= 0:
        return
    older = [p for p in list_checkpoints(root.parent) if _step(p) < _step(new)]
    kept = 1
    for path in reversed(older):
        if kept < keep and checkpoint_problem(path, checksums=False) is None:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)
