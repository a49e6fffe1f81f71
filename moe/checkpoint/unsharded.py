"""Any checkpoint, whole, in one process: ``full_state`` and ``consolidate`` to one file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe.checkpoint.integrity import _folder, read_extra
from moe.checkpoint.sharding import MODEL, OPT_GROUPS, OPT_STATE, _dcp_quiet, _metadata

# What a consolidated file holds (no optimizer, loader or RNG state).
CONSOLIDATED_KEYS = ("model", "config", "step", "tokens", "layout")


def _placeholder(md):
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return None  # bytes: DCP replaces the value with the unpickled object


def full_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Any checkpoint (a step folder or a file in it), unsharded, in this one process (no
    process group needed)::

        {"model": {fqn: tensor}, "optimizer": {"state": {fqn: {name: value}},
         "param_groups": {fqn: {hyper: value}}}, **extra}

    ``"model"`` is a full plain state dict for ``build_model(cfg.model)``; ``"optimizer"`` is
    keyed by parameter name (absent if none was saved).
    """
    path = _folder(path)
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
    "tokens", "layout"} (the weights unsharded; no optimizer, loader or RNG state).
    ``moe.checkpoint.load_model`` loads it like a checkpoint folder."""
    full = full_state(path)
    state = {k: full[k] for k in CONSOLIDATED_KEYS if k in full}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return out
