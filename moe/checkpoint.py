"""Checkpoints in one process: the same sharded DCP format as distributed runs (mesh None).

The format, its layout on disk and how saves stay atomic are described in
moe/parallel/checkpoint.py; this module is the single-process front end the trainer and the
analysis tools use::

    save_checkpoint(run_dir, step, {"model": model, "optimizer": opt, "step": ..., ...})
    extra = read_extra(ckpt)                         # config, step, loader, RNG (no tensors)
    restore_checkpoint(ckpt, model, optimizer)       # in place, exact
    state = load_checkpoint(ckpt)                    # {"model": full plain state dict,
                                                     #  "optimizer": name-keyed, "config", ...}

The trainer, which runs in one process or under torchrun, uses the layout-aware pair
``save_training_state(run_dir, step, parts, optimizer, extra, mesh, keep)`` and
``load_training_state(ckpt, parts, optimizer, mesh) -> extra`` (moe.parallel.checkpoint's
``save`` / ``load``; ``mesh=None`` in one process).

A checkpoint written by any layout (tp x pp x dp x ep) loads here, and one written here
resumes any layout. Folders from before this format (``step_*/state.pt``) still load.
``resolve_checkpoint`` (a run folder -> its newest checkpoint that verifies) is how every
tool picks the checkpoint to load; it warns in one line about each broken one it skips.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe.parallel.checkpoint import (MODEL, CheckpointError, check_checkpoint, checkpoint_dir,
                                     checkpoint_problem, full_state, is_checkpoint,
                                     latest_checkpoint, latest_good_checkpoint, list_checkpoints,
                                     load, model_state, optimizer_state, read_extra, save,
                                     save_state)

__all__ = ["CheckpointError", "check_checkpoint", "checkpoint_dir", "checkpoint_problem",
           "is_checkpoint", "latest_checkpoint", "latest_good_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_checkpoint_model", "resolve_checkpoint",
           "load_trained_model", "load_training_state", "read_extra", "restore_checkpoint",
           "save_checkpoint", "save_training_state"]

save_training_state = save  # (run_dir, step, parts, optimizer, extra, mesh=None, keep=2)
load_training_state = load  # (path, parts, optimizer=None, mesh=None) -> extra


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save ``state`` as the checkpoint of ``step``, atomically; keep the newest ``keep``.

    ``state["model"]``: the model (``nn.Module``) or a plain state dict; ``state["optimizer"]``
    (optional): the optimizer itself, which needs the module to name its parameters. Every
    other entry (step, tokens, loader state, RNG, config dict, ...) is stored as is.
    """
    extra = dict(state)
    model, optimizer = extra.pop("model", None), extra.pop("optimizer", None)
    if isinstance(model, nn.Module):
        tensors = model_state([model])
        if optimizer is not None:
            tensors.update(optimizer_state([model], optimizer))
    else:
        if optimizer is not None:
            raise TypeError('save_checkpoint: pass state["model"] as the nn.Module when saving '
                            'an optimizer (its state is keyed by parameter name)')
        tensors = {MODEL + k: v.detach() for k, v in (model or {}).items()}
    return save_state(run_dir, step, tensors, extra, mesh=None, keep=keep)


def restore_checkpoint(path: str | Path, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load the weights (and AdamW state) of any checkpoint into ``model`` / ``optimizer`` in
    place, exactly as saved; returns the checkpoint's extra dict."""
    return load(path, [model], optimizer, mesh=None)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Any checkpoint (a ``step_*`` folder or a file in it), unsharded:
    ``{"model": full plain state dict, "optimizer": {...}, "config": ..., **extra}``."""
    return full_state(path, map_location)


def _is_step_folder(path: Path) -> bool:
    return is_checkpoint(path) or path.name.startswith(("step_", ".tmp_step_", ".old_step_"))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to load for ``path``, verified (see moe/parallel/checkpoint.py):

    - a run folder: its newest good checkpoint; broken newer ones are skipped with a one-line
      warning each; FileNotFoundError if it has none, CheckpointError if none is usable;
    - a step folder (or a file in it): that one, or CheckpointError if it is broken (a
      checkpoint named by the user never silently becomes another).
    """
    path = Path(path)
    if path.is_dir() and not _is_step_folder(path):
        latest = latest_good_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path} (nor in {path}/checkpoints)")
        return latest
    return check_checkpoint(path)


def load_trained_model(checkpoint: str | Path):
    """(model, config) of a training checkpoint: a ``step_*`` folder, or a run folder meaning
    its latest checkpoint. Any layout's checkpoint loads, unsharded, in eval mode on the CPU."""
    from moe.config import from_dict
    from moe.model import build_model

    state = load_checkpoint(resolve_checkpoint(checkpoint))
    cfg = from_dict(state["config"]).validate()
    model = build_model(cfg.model)  # build_model keeps tied embeddings tied
    sd = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


def load_checkpoint_model(checkpoint: str | Path) -> torch.nn.Module:
    """The model of a training checkpoint (see ``load_trained_model``)."""
    return load_trained_model(checkpoint)[0]
