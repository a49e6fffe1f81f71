"""Model and AdamW state as flat, name-keyed DCP state dicts, and loading them in any layout.

Keys (flat; ``<fqn>`` is a parameter name of the full model, e.g.
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

With a mesh, each local parameter becomes a DTensor over the mesh dimensions other than "pp"
(``mesh["dp", "ep", "tp"]`` at this rank's pp coordinate): ``Shard(d)`` on a mesh dimension
where its ``ShardRecord`` splits it (moe/parallel/shards.py), ``Replicate()`` on the others.
Ranks at different pp coordinates hold different keys: DCP's plan takes the union of all ranks'
keys (and writes each replicated chunk once), so no DTensor needs to span "pp". Without a mesh (one
process) the same keys hold plain full tensors. Loading builds the same DTensors for the
loading layout and lets ``dcp.load`` read each rank's slice: that is the resharding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe.checkpoint.integrity import _folder, read_extra
from moe.parallel.shards import ShardRecord, local_tensor, named_records, record

MODEL, OPT_STATE, OPT_GROUPS = "model.", "optim.state.", "optim.param_groups."
# Optimizer settings that describe the local implementation, not the optimisation: kept as
# the loading optimizer has them (a CPU save resumed on GPU keeps its fused/foreach choice).
_IMPL_KEYS = ("params", "foreach", "fused", "capturable", "differentiable")


def _parts(parts) -> list[nn.Module]:
    """The stage modules this rank holds: one module, or a list of them."""
    return [parts] if isinstance(parts, nn.Module) else list(parts)


def _dcp_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


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


def _placements(rec: ShardRecord, sub) -> list:
    from torch.distributed.tensor import Replicate, Shard

    places, used = [], set()
    for name in sub.mesh_dim_names:
        dim = rec.dim_on(name)
        if dim is not None:
            # FSDP2 cuts a dense parameter over the flattened dp x ep ranks: Shard(d) on "dp"
            # then on "ep" is the same chunking (mesh order, dp outer), so d may repeat there.
            if dim in used and not (name == "ep" and dim == rec.dp_dim):
                raise NotImplementedError(f"tensor dim {dim} is split over two mesh dims {rec}")
            used.add(dim)
            places.append(Shard(dim))
        else:
            places.append(Replicate())
    return places


def _global_shape(local: torch.Tensor, rec: ShardRecord, sub) -> tuple:
    shape = list(local.shape)
    if sub is not None:
        for i, name in enumerate(sub.mesh_dim_names):
            dim = rec.dim_on(name)
            if dim is not None:
                shape[dim] *= sub.size(i)
    return tuple(shape)


def _wrap(local: torch.Tensor, rec: ShardRecord, sub):
    """``local`` as a DTensor over ``sub`` placed per ``rec``; plain without a mesh or if 0-dim."""
    if sub is None or local.ndim == 0:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, sub, _placements(rec, sub), run_check=False)


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as state of parameter ``p``: a DTensor placed like ``p`` if ``p`` is one
    (FSDP2), so that AdamW updates DTensors with DTensors."""
    if not hasattr(p, "to_local") or not torch.is_tensor(local) or local.ndim == 0:
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def _named_params(parts: Iterable[nn.Module]) -> dict[int, tuple[str, ShardRecord]]:
    """id(param) -> (full-model name, its shard record); a tied parameter keeps its first name."""
    return {id(p): (_strip(name), rec) for name, p, rec in named_records(list(parts))}


def _check_mesh(parts: Iterable[nn.Module], mesh) -> None:
    if mesh is None:
        for name, _, rec in named_records(list(parts)):
            if rec.sharded:
                raise ValueError(f"{name} is sharded ({rec}) but no mesh was given")


def model_state(parts, mesh=None) -> dict:
    """``{"model.<fqn>": tensor}`` for this rank's stage modules ``parts`` (the model itself
    without pipeline parallelism): DTensors over the non-pp mesh dims, or plain tensors without
    a mesh. The tensors share storage with the parameters (nothing is copied)."""
    parts = _parts(parts)
    _check_mesh(parts, mesh)
    sub = _submesh(mesh)
    out = {}
    for part in parts:
        for name, t in part.state_dict(keep_vars=True).items():
            local = local_tensor(t.detach())
            out[MODEL + _strip(name)] = _wrap(local, record(part, name), sub)
    return out


def optimizer_state(parts, optimizer: torch.optim.Optimizer, mesh=None) -> dict:
    """The optimizer's state keyed by parameter name (see the module doc for the keys).

    State tensors shaped like their parameter are placed like it; scalars (AdamW's ``step``)
    stay plain tensors, identical on every rank that holds the parameter. Parameters without
    state on this rank (none yet, or owned by another rank under ZeRO-1) contribute no keys.
    """
    parts = _parts(parts)
    names = _named_params(parts)
    sub = _submesh(mesh)
    out: dict = {}
    for group in optimizer.param_groups:
        hyper = tuple(sorted((k, v) for k, v in group.items() if k not in _IMPL_KEYS))
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(f"an optimizer parameter of shape {tuple(p.shape)} is in none "
                                 f"of the given modules: pass every stage module this rank holds")
            fqn, rec = names[id(p)]
            for k, v in optimizer.state.get(p, {}).items():
                key = f"{OPT_STATE}{fqn}.{k}"
                if torch.is_tensor(v) and v.ndim > 0:
                    if v.shape != p.shape:
                        raise ValueError(f"{key}: state of shape {tuple(v.shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}")
                    out[key] = _wrap(local_tensor(v.detach()), rec, sub)
                else:
                    out[key] = v.detach() if torch.is_tensor(v) else v
            out[OPT_GROUPS + fqn] = hyper
    return out


def _metadata(path: Path) -> dict:
    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def _step_device(group: dict, p: torch.Tensor) -> torch.device:
    # torch.optim keeps AdamW's step on the CPU unless the implementation is fused/capturable
    return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def restore_checkpoint(path: str | Path, parts, optimizer: torch.optim.Optimizer | None = None,
                       mesh=None, missing_ok: Callable[[str], bool] | None = None) -> dict:
    """Load a checkpoint saved in any layout into this rank's ``parts`` (the model, or the
    list of stage modules this rank holds) and ``optimizer``, in place and in the current
    layout; returns its extra dict (loader state, RNG, step, tokens, config, ...).

    Parameters get exactly the saved values of their slice; AdamW state is created where the
    optimizer has none (exp_avg, exp_avg_sq, step as saved) and group hyper-parameters are
    restored. Collective with a mesh; with ``mesh=None`` it needs no process group.
    ``missing_ok(name)``: model tensors the checkpoint may lack, kept as they are (weights
    only: not with an optimizer); any other missing one is a KeyError.
    """
    if missing_ok is not None and optimizer is not None:
        raise ValueError("missing_ok loads weights only: pass optimizer=None")
    path = _folder(path)
    parts = _parts(parts)
    _check_mesh(parts, mesh)
    meta = _metadata(path)
    sub = _submesh(mesh)
    targets: dict = {}
    sinks: list = []  # (key, destination tensor) to copy into after the load

    def add(key: str, local: torch.Tensor, rec: ShardRecord, what: str) -> None:
        md = meta.get(key)
        want = _global_shape(local, rec, sub)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{path} has no {what} {key!r}: was it saved from a different model? "
                           f"(compare config.yaml with the checkpoint's extra.pt)")
        if tuple(md.size) != want:
            raise ValueError(f"{key}: {path} holds shape {tuple(md.size)}, this model "
                             f"{want}: the model config differs")
        targets[key] = _wrap(local, rec, sub)

    for part in parts:
        for name, t in part.state_dict(keep_vars=True).items():
            key = MODEL + _strip(name)
            if missing_ok is not None and key not in meta and missing_ok(_strip(name)):
                continue
            add(key, local_tensor(t.detach()), record(part, name), "model tensor")
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
                fqn, rec = names[id(p)]
                for k in saved.get(fqn, []):
                    key, md = f"{OPT_STATE}{fqn}.{k}", meta[f"{OPT_STATE}{fqn}.{k}"]
                    if not isinstance(md, TensorStorageMetadata):
                        targets[key] = None  # a python value, read back as it was saved
                    elif len(md.size) == 0:
                        targets[key] = torch.zeros((), dtype=md.properties.dtype,
                                                   device=_step_device(group, p))
                    else:
                        local = torch.zeros(local_tensor(p).shape, dtype=md.properties.dtype,
                                            device=p.device)
                        add(key, local, rec, "optimizer tensor")
                    new_state.setdefault(p, {})[k] = key
                if gi not in hyper_keys and OPT_GROUPS + fqn in meta:
                    hyper_keys[gi] = OPT_GROUPS + fqn
                    targets[OPT_GROUPS + fqn] = None  # read back as saved

    reader = dcp.FileSystemReader(path)
    _dcp_quiet(dcp.load, targets, storage_reader=reader, planner=DefaultLoadPlanner(),
               no_dist=mesh is None)

    with torch.no_grad():
        for key, t in sinks:
            src, dst = local_tensor(targets[key]), local_tensor(t)
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
    if optimizer is not None:
        for p, keys in new_state.items():
            optimizer.state[p] = {k: _like(p, local_tensor(targets[key]))
                                  for k, key in keys.items()}
        for gi, key in hyper_keys.items():
            optimizer.param_groups[gi].update(dict(targets[key]))
    return read_extra(path)
