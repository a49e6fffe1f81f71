"""One checkpoint format for every layout: sharded saves with torch.distributed.checkpoint (DCP).

A run saved at tp=2 x pp=2 resumes at dp=4 or in one process (and back) with the same state:
every tensor is stored under the FULL model's names with its global shape, and DCP reads each
rank's slice of it for whatever layout loads it (resharding happens inside ``dcp.load``).

On disk (``<run_dir>/checkpoints/``)::

    step_00000100/              one complete checkpoint (the folder name is its step)
        .metadata               DCP: every key's global shape, dtype and where its chunks lie
        __0_0.distcp ...        DCP: the tensor data, one file per writing rank
        extra.pt                torch.save'd dict, written by rank 0: loader state, RNG,
                                step, tokens, resolved config, layout sizes, format version
        manifest.json           written by rank 0 LAST: every other file's size and crc32
    .tmp_step_00000200/         a save in progress (or one that crashed): never loaded

Keys of the DCP state dict (flat; ``<fqn>`` is a parameter name of the full model, e.g.
``layers.0.attention.wq.weight``; the module names are an API, see moe/model/transformer.py)::

    model.<fqn>                           parameter or persistent buffer, global shape
    optim.state.<fqn>.<name>              AdamW state: exp_avg / exp_avg_sq (the parameter's
                                          global shape) and step (a 0-dim tensor)
    optim.param_groups.<fqn>              the hyper-parameters of the group holding <fqn>, one
                                          small object: a tuple of (name, value) pairs (lr,
                                          betas, eps, weight_decay, ...; a tuple, not a dict,
                                          so DCP stores it as one item instead of flattening it)

This is the flattened, name-keyed form of ``torch.distributed.checkpoint.state_dict.
get_state_dict``; keying AdamW state by parameter name instead of by position in the param
groups is what makes it independent of which parameters a rank holds.

In memory, with a mesh, each local parameter becomes a DTensor over the mesh dimensions other
than "pp" (``mesh["dp", "ep", "tp"]`` at this rank's pp coordinate): ``Shard(d)`` on a mesh
dimension named in its ``shard_spec`` (moe/parallel/mesh.py), ``Replicate()`` on the others.
Ranks at different pp coordinates hold different keys: DCP's plan takes the union of all
ranks' keys (and writes each replicated chunk once), so no DTensor needs to span "pp".
Without a mesh (one process) the same keys hold plain full tensors.

Atomicity: everything is written into ``.tmp_step_N``; after every rank's DCP files and the
metadata are on disk (fsync'd) rank 0 writes ``extra.pt`` and then ``manifest.json`` (both
fsync'd) and renames the folder to ``step_N``. Only ``step_*`` folders holding ``extra.pt``
count as checkpoints, so a crash at any point leaves the previous checkpoint as the latest and
never a half-written one that looks complete; the next save deletes the leftover temporary
folder.

Verification: a checkpoint can still break after it was written (a truncated copy, a full
disk during rsync, bit rot). ``latest_good_checkpoint`` is the one place that decides which
checkpoint of a run is usable (the trainer, consolidate, generate, export and the analysis
tools all call it, via ``moe.checkpoint.resolve_checkpoint`` outside the trainer): newest
first, it checks each file's size and crc32 against the manifest, skips a broken one with a
one-line warning naming it and falls back to the previous one; ``CheckpointError`` (one line)
when checkpoints exist but none verifies. crc32, not sha256: it finds accidental damage (not
tampering) at ~1.5 GB/s against sha256's ~0.9 GB/s on these CPUs. A folder written before
manifests existed is checked against its DCP metadata (every chunk's file, offset and length)
and loaded with a one-line note.

PLATFORM.md: a job that called ``dcp.save`` sometimes aborts at exit with ``terminate called
without an active exception`` after all its work is done (4 of 26 runs on gloo). ``save``
returns only after the checkpoint is renamed into place, fsync'd, and every rank has passed a
barrier, so such an abort cannot lose or corrupt a checkpoint; launchers should judge a run
by its checkpoints and metrics.jsonl rather than by the exit status alone.

ZeRO-1 (not implemented here): optimizer state may live on only one rank of its replica group.
``optimizer_state`` saves only the parameters that have state in ``optimizer.state`` on this
rank, and ``load`` only creates state for the parameters in ``optimizer.param_groups``, so an
optimizer that holds (and is built over) just the owned parameters saves and loads exactly
its keys: DCP writes a key that one rank holds just as one replicated on many. A ZeRO variant
that splits each parameter's state across dp ranks would instead give its state a
``Shard(d)`` placement on "dp" (a ``"dp": d`` entry in the spec passed to ``_wrap``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe.parallel.mesh import shard_spec

FORMAT = 1
EXTRA_FILE = "extra.pt"  # its presence marks a complete checkpoint
MANIFEST_FILE = "manifest.json"  # written last: {"files": {name: {"size", "crc32"}}}
LEGACY_FILE = "state.pt"  # the former single-file format: still listed and loaded
MODEL, OPT_STATE, OPT_GROUPS = "model.", "optim.state.", "optim.param_groups."
# Optimizer settings that describe the local implementation, not the optimisation: kept as
# the loading optimizer has them (a CPU save resumed on GPU keeps its fused/foreach choice).
_IMPL_KEYS = ("params", "foreach", "fused", "capturable", "differentiable")


class CheckpointError(ValueError):
    """No usable checkpoint, or a named one that is broken; the message is one line."""


# --- folders ------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint folder (DCP with extra.pt, or the legacy state.pt)."""
    path = Path(path)
    return (path / EXTRA_FILE).is_file() or (path / LEGACY_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and is_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, unverified: to load one, use latest_good_checkpoint."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# --- verification -------------------------------------------------------------------------------


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: str | Path, checksums: bool = True) -> str | None:
    """Why the checkpoint ``path`` (a step folder, or a legacy state.pt) cannot be loaded, in a
    few words; None when it can. Sizes always, crc32s too unless ``checksums=False``. A folder
    without a manifest (written before manifests) is checked against its DCP metadata."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    legacy = _legacy(path)
    if legacy is not None and not (path / MANIFEST_FILE).exists():
        try:  # torch.save's zip: a truncated file has lost its central directory
            zipfile.ZipFile(legacy).close()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{legacy.name} is unreadable ({e})"
        return None
    if not (path / EXTRA_FILE).is_file():
        return f"no {EXTRA_FILE} (an unfinished save?)"
    if not (path / MANIFEST_FILE).is_file():
        return _check_against_metadata(path)
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        entries = [(name, int(e["size"]), int(e["crc32"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
    names = {name for name, _, _ in entries}
    for need in (".metadata", EXTRA_FILE):
        if need not in names:
            return f"{MANIFEST_FILE} does not list {need}"
    for name, size, crc in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, its manifest says {size}"
    if checksums:
        for name, _, crc in entries:
            if _crc32(path / name) != crc:
                return f"{name} fails its crc32 check: the file is damaged"
    return None


def _check_against_metadata(path: Path) -> str | None:
    """A folder from before manifests: every chunk the DCP metadata names must lie inside its
    file, and extra.pt must load (it is small)."""
    try:
        storage = dcp.FileSystemReader(path).read_metadata().storage_data or {}
        torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means unusable
        return f"unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            return f"{name} has {size or 0} bytes, its DCP metadata needs {end}"
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def check_checkpoint(path: str | Path, say=_say) -> Path:
    """``path`` (a step folder or a file in it) if it verifies; CheckpointError naming it and
    the problem if not (a checkpoint asked for by name never falls back to another)."""
    path = _folder(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is broken: {problem}")
    _note_unverified(path, say)
    return path


def _note_unverified(path: Path, say) -> None:
    if _legacy(path) is None and not (path / MANIFEST_FILE).exists():
        say(f"note: {path} has no {MANIFEST_FILE} (saved by an older version): checked "
            f"against its DCP metadata only")


def latest_good_checkpoint(run_dir: str | Path, mesh=None, say=_say) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (see ``checkpoint_problem``); each
    newer broken one is skipped with a one-line warning naming it. None when the run has no
    checkpoint at all; CheckpointError (one line) when it has some but none is usable.

    Collective with a mesh: rank 0 verifies and broadcasts its choice (or its error), so every
    rank loads the same checkpoint and only rank 0 prints."""
    if mesh is not None:
        out: list = [None]
        if _rank() == 0:
            try:
                out[0] = ("ok", latest_good_checkpoint(run_dir, None, say))
            except CheckpointError as e:
                out[0] = ("error", str(e))
        dist.broadcast_object_list(out, src=0)
        kind, value = out[0]
        if kind == "error":
            raise CheckpointError(value)
        return value
    ckpts = list_checkpoints(run_dir)
    broken = []
    for path in reversed(ckpts):
        problem = checkpoint_problem(path)
        if problem is None:
            _note_unverified(path, say)
            return path
        broken.append(f"{path.name} ({problem})")
        say(f"warning: skipping broken checkpoint {path}: {problem}; trying the previous one")
    if broken:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: "
                              f"{'; '.join(broken)}. Restore one, or move the folder away to "
                              f"start afresh")
    return None


def _folder(path: str | Path) -> Path:
    """A checkpoint folder from the folder itself or a file in it."""
    path = Path(path)
    if path.is_file() and path.name != LEGACY_FILE:
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def _legacy(path: Path) -> Path | None:
    if path.is_file():
        return path
    return path / LEGACY_FILE if (path / LEGACY_FILE).is_file() else None


# --- building state dicts -----------------------------------------------------------------------


def _strip(name: str) -> str:
    return name.replace("_orig_mod.", "")  # a torch.compile wrapper adds it; names are an API


def _submesh(mesh):
    """The mesh dimensions a parameter can be split or replicated over: all but "pp"."""
    if mesh is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    rest = tuple(n for n in names if n != "pp")
    if not rest:
        return None  # pure pipeline: every rank holds whole, distinct tensors
    return mesh if rest == names else mesh[rest]


def _placements(spec: dict, sub) -> list:
    from torch.distributed.tensor import Replicate, Shard

    places, used = [], set()
    for name in sub.mesh_dim_names:
        dim = spec.get(name)
        if isinstance(dim, int) and not isinstance(dim, bool):
            if dim in used:
                raise NotImplementedError(f"tensor dim {dim} is split over two mesh dims {spec}")
            used.add(dim)
            places.append(Shard(dim))
        else:
            places.append(Replicate())
    return places


def _global_shape(local: torch.Tensor, spec: dict, sub) -> tuple:
    shape = list(local.shape)
    if sub is not None:
        for i, name in enumerate(sub.mesh_dim_names):
            dim = spec.get(name)
            if isinstance(dim, int) and not isinstance(dim, bool):
                shape[dim] *= sub.size(i)
    return tuple(shape)


def _wrap(local: torch.Tensor, spec: dict, sub):
    """``local`` as a DTensor over ``sub`` placed per ``spec``; plain without a mesh or if 0-dim."""
    if sub is None or local.ndim == 0:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, sub, _placements(spec, sub), run_check=False)


def _local(t) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _named_params(parts: Iterable[nn.Module]) -> dict[int, tuple[str, nn.Parameter]]:
    """id(param) -> (full-model name, param); a tied parameter keeps its first name."""
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for part in parts:
        for name, p in part.named_parameters():
            out.setdefault(id(p), (_strip(name), p))
    return out


def _check_mesh(parts: Iterable[nn.Module], mesh) -> None:
    if mesh is None:
        for part in parts:
            for name, p in part.named_parameters():
                if any(k in shard_spec(p) for k in ("tp", "ep", "dp")):
                    raise ValueError(f"{name} is sharded ({shard_spec(p)}) but no mesh was given")


def model_state(parts: Iterable[nn.Module], mesh=None) -> dict:
    """``{"model.<fqn>": tensor}`` for this rank's stage modules ``parts`` (``[model]`` without
    pipeline parallelism): DTensors over the non-pp mesh dims, or plain tensors without a mesh.
    The tensors share storage with the parameters (nothing is copied)."""
    parts = list(parts)
    _check_mesh(parts, mesh)
    sub = _submesh(mesh)
    out = {}
    for part in parts:
        for name, t in part.state_dict(keep_vars=True).items():
            out[MODEL + _strip(name)] = _wrap(t.detach(), shard_spec(t), sub)
    return out


def optimizer_state(parts: Iterable[nn.Module], optimizer: torch.optim.Optimizer,
                    mesh=None) -> dict:
    """The optimizer's state keyed by parameter name (see the module doc for the keys).

    State tensors shaped like their parameter are placed like it; scalars (AdamW's ``step``)
    stay plain tensors, identical on every rank that holds the parameter. Parameters without
    state on this rank (none yet, or owned by another rank under ZeRO-1) contribute no keys.
    """
    parts = list(parts)
    names = _named_params(parts)
    sub = _submesh(mesh)
    out: dict = {}
    for group in optimizer.param_groups:
        hyper = tuple(sorted((k, v) for k, v in group.items() if k not in _IMPL_KEYS))
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"an optimizer parameter of shape {tuple(p.shape)} is in none "
                                 f"of the given modules: pass every stage module this rank holds")
            fqn = names[id(p)][0]
            for k, v in optimizer.state.get(p, {}).items():
                key = f"{OPT_STATE}{fqn}.{k}"
                if torch.is_tensor(v) and v.ndim > 0:
                    if v.shape != p.shape:
                        raise ValueError(f"{key}: state of shape {tuple(v.shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}")
                    out[key] = _wrap(v.detach(), shard_spec(p), sub)
                else:
                    out[key] = v.detach() if torch.is_tensor(v) else v
            out[OPT_GROUPS + fqn] = hyper
    return out


# --- saving -------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def _dcp_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


def save_state(run_dir: str | Path, step: int, state: dict, extra: dict, mesh=None,
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
    _write_manifest(tmp)  # last: it vouches for every other file
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
    step = int(new.name.split("_")[1])
    older = [p for p in list_checkpoints(root.parent) if int(p.name.split("_")[1]) < step]
    kept = 1
    for path in reversed(older):
        if kept < keep and checkpoint_problem(path, checksums=False) is None:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)


def save(run_dir: str | Path, step: int, parts: Iterable[nn.Module],
         optimizer: torch.optim.Optimizer | None, extra: dict, mesh=None, keep: int = 2) -> Path:
    """Save this rank's ``parts`` (stage modules; ``[model]`` without pipeline parallelism)
    and ``optimizer`` as the checkpoint of ``step`` under ``<run_dir>/checkpoints``.

    ``extra`` (loader state, RNG, step, tokens, resolved config dict, ...) is written by rank 0
    only, with the layout sizes added. Collective with a mesh; returns the checkpoint folder.
    """
    parts = list(parts)
    state = model_state(parts, mesh)
    if optimizer is not None:
        state.update(optimizer_state(parts, optimizer, mesh))
    return save_state(run_dir, step, state, extra, mesh, keep)


# --- loading ------------------------------------------------------------------------------------


def read_extra(path: str | Path) -> dict:
    """The non-tensor state of a checkpoint (config, step, loader, RNG, ...), on the CPU."""
    path = _folder(path)
    legacy = _legacy(path)
    if legacy is not None:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    return torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)


def _metadata(path: Path) -> dict:
    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def _step_device(group: dict, p: torch.Tensor) -> torch.device:
    # torch.optim keeps AdamW's step on the CPU unless the implementation is fused/capturable
    return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def load(path: str | Path, parts: Iterable[nn.Module],
         optimizer: torch.optim.Optimizer | None = None, mesh=None) -> dict:
    """Load a checkpoint saved in any layout into this rank's ``parts`` and ``optimizer``, in
    place and in the current layout; returns its extra dict.

    Parameters get exactly the saved values of their slice; AdamW state is created where the
    optimizer has none (exp_avg, exp_avg_sq, step as saved) and group hyper-parameters are
    restored. Collective with a mesh; with ``mesh=None`` it needs no process group.
    """
    path = _folder(path)
    parts = list(parts)
    if _legacy(path) is not None:
        if mesh is not None or len(parts) != 1:
            raise ValueError(f"{path} is a single-file (legacy) checkpoint: load it in one "
                             f"process, or convert it with scripts/consolidate.py")
        state = torch.load(_legacy(path), map_location="cpu", weights_only=True)
        parts[0].load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return read_extra(path)

    _check_mesh(parts, mesh)
    meta = _metadata(path)
    sub = _submesh(mesh)
    targets: dict = {}
    sinks: list = []  # (key, destination tensor) to copy into after the load

    def add(key: str, local: torch.Tensor, spec: dict, what: str) -> None:
        md = meta.get(key)
        want = _global_shape(local, spec, sub)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{path} has no {what} {key!r}: was it saved from a different model? "
                           f"(compare config.yaml with the checkpoint's extra.pt)")
        if tuple(md.size) != want:
            raise ValueError(f"{key}: {path} holds shape {tuple(md.size)}, this model "
                             f"{want}: the model config differs")
        targets[key] = _wrap(local, spec, sub)

    for part in parts:
        for name, t in part.state_dict(keep_vars=True).items():
            key = MODEL + _strip(name)
            add(key, t.detach(), shard_spec(t), "model tensor")
            sinks.append((key, t))

    new_state: dict = {}  # param -> {state name: tensor}
    hyper_keys: dict = {}  # param group index -> key of its hyper-parameters
    if optimizer is not None:
        names = _named_params(parts)
        saved: dict[str, list[str]] = {}
        for key in meta:
            if key.startswith(OPT_STATE):
                fqn, _, k = key[len(OPT_STATE):].rpartition(".")
                saved.setdefault(fqn, []).append(k)
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError("an optimizer parameter is in none of the given modules")
                fqn = names[id(p)][0]
                for k in saved.get(fqn, []):
                    key, md = f"{OPT_STATE}{fqn}.{k}", meta[f"{OPT_STATE}{fqn}.{k}"]
                    if not isinstance(md, TensorStorageMetadata):
                        targets[key] = None  # a python value, read back as it was saved
                    elif len(md.size) == 0:
                        targets[key] = torch.zeros((), dtype=md.properties.dtype,
                                                   device=_step_device(group, p))
                    else:
                        local = torch.zeros(p.shape, dtype=md.properties.dtype, device=p.device)
                        add(key, local, shard_spec(p), "optimizer tensor")
                    new_state.setdefault(p, {})[k] = key
                if gi not in hyper_keys and OPT_GROUPS + fqn in meta:
                    hyper_keys[gi] = OPT_GROUPS + fqn
                    targets[OPT_GROUPS + fqn] = None  # read back as saved

    reader = dcp.FileSystemReader(path)
    _dcp_quiet(dcp.load, targets, storage_reader=reader, planner=DefaultLoadPlanner(),
               no_dist=mesh is None)

    with torch.no_grad():
        for key, t in sinks:
            src = _local(targets[key])
            if src.data_ptr() != t.data_ptr():
                t.copy_(src)
    if optimizer is not None:
        for p, keys in new_state.items():
            optimizer.state[p] = {k: _local(targets[key]) for k, key in keys.items()}
        for gi, key in hyper_keys.items():
            optimizer.param_groups[gi].update(dict(targets[key]))
    return read_extra(path)


def _placeholder(md):
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return None  # bytes: DCP replaces the value with the unpickled object


def full_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Any checkpoint, unsharded, in this one process (no process group needed)::

        {"model": {fqn: tensor}, "optimizer": {"state": {fqn: {name: value}},
         "param_groups": {fqn: {hyper: value}}}, **extra}

    ``"model"`` is a full plain state dict for ``build_model(cfg.model)``; ``"optimizer"`` is
    keyed by parameter name (absent if none was saved).
    """
    path = _folder(path)
    legacy = _legacy(path)
    if legacy is not None:
        return torch.load(legacy, map_location=map_location, weights_only=True)
    meta = _metadata(path)
    flat = {k: _placeholder(md) for k, md in meta.items()}
    _dcp_quiet(dcp.load, flat, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    model: dict = {}
    opt: dict = {"state": {}, "param_groups": {}}
    for key in sorted(meta):  # deterministic order; model keys re-ordered below
        v = flat[key]
        if torch.is_tensor(v):
            v = v.to(map_location)
        if key.startswith(MODEL):
            model[key[len(MODEL):]] = v
        elif key.startswith(OPT_STATE):
            fqn, _, k = key[len(OPT_STATE):].rpartition(".")
            opt["state"].setdefault(fqn, {})[k] = v
        elif key.startswith(OPT_GROUPS):
            opt["param_groups"][key[len(OPT_GROUPS):]] = dict(v)
    out = {**read_extra(path), "model": _model_order(model)}
    if opt["state"] or opt["param_groups"]:
        out["optimizer"] = opt
    return out


def _model_order(model: dict) -> dict:
    """Keys in the model's own order (embeddings, layers by index, norm, output)."""
    def rank(name: str):
        head = name.split(".")[0]
        if head == "layers":
            idx = name.split(".")[1]
            return (1, int(idx) if idx.isdigit() else 0, name)
        return ({"tok_embeddings": 0, "norm": 2, "output": 3}.get(head, 4), 0, name)

    return {k: model[k] for k in sorted(model, key=rank)}


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write any checkpoint as one plain ``torch.save`` file: {"model", "config", "step",
    "tokens", "layout"} (the weights unsharded; no optimizer, loader or RNG state)."""
    full = full_state(path)
    state = {k: full[k] for k in ("model", "config", "step", "tokens", "layout") if k in full}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out
