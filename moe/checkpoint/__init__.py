"""Checkpoints: one format for every layout, sharded saves with torch.distributed.checkpoint
(DCP); the front end the trainer, the tools and the tests use::

    save_checkpoint(run_dir, step, model, optimizer, extra, mesh=None, keep=2) -> step folder
    extra = restore_checkpoint(ckpt, model, optimizer, mesh=None)   # resume training, exactly
    loaded = load_model(path)      # a run folder, step folder or consolidated file, for
                                   # inference, export and analysis: .model .cfg .tokenizer
    state = full_state(ckpt)       # every tensor, whole: {"model", "optimizer", **extra}
    extra = read_extra(ckpt)       # config, step, loader, RNG (no tensors)

``model`` is the model, or under pipeline parallelism the list of stage modules this rank
holds.

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

One job per file:

- ``sharding``: the DCP state dict's keys, DTensor placement from each parameter's
  ``ShardRecord``, and ``restore_checkpoint`` (load into the current layout: the resharding);
- ``atomic``: ``save_checkpoint``, the write-then-rename protocol and rotation;
- ``integrity``: listing checkpoints, the manifest, ``checkpoint_problem``,
  ``check_checkpoint``, ``latest_good_checkpoint``, ``CheckpointError``;
- ``unsharded``: ``full_state`` (every tensor, whole, in one process) and ``consolidate``
  (one plain file);
- ``load``: ``load_model`` and ``resolve_checkpoint`` (which checkpoint a tool loads).

ZeRO-1 (moe/optim/zero.py): optimizer state may live on only one rank of its replica group.
``optimizer_state`` saves only the parameters that have state in ``optimizer.state`` on this
rank, and ``restore_checkpoint`` only creates state for the parameters in
``optimizer.param_groups``, so an optimizer that holds (and is built over) just the owned
parameters saves and loads exactly its keys: DCP writes a key that one rank holds just as one
replicated on many. A ZeRO variant that splits each parameter's state across dp ranks would
instead give its state a ``Shard(d)`` placement on "dp" (a ``"dp": d`` entry in the spec
passed to ``sharding._wrap``).
"""

from moe.checkpoint.atomic import save_checkpoint
from moe.checkpoint.integrity import (
    EXTRA_FILE,
    MANIFEST_FILE,
    CheckpointError,
    check_checkpoint,
    checkpoint_dir,
    checkpoint_problem,
    is_checkpoint,
    latest_checkpoint,
    latest_good_checkpoint,
    list_checkpoints,
    read_extra,
)
from moe.checkpoint.load import (
    IMPORTED,
    UPCYCLED,
    WEIGHTS_ONLY,
    LoadedModel,
    load_model,
    resolve_checkpoint,
    saved_config,
)
from moe.checkpoint.sharding import model_state, optimizer_state, restore_checkpoint
from moe.checkpoint.unsharded import consolidate, full_state

__all__ = ["EXTRA_FILE", "IMPORTED", "MANIFEST_FILE", "CheckpointError", "LoadedModel",
           "check_checkpoint", "checkpoint_dir", "checkpoint_problem", "consolidate", "full_state",
           "is_checkpoint", "latest_checkpoint", "latest_good_checkpoint", "list_checkpoints",
           "load_model", "model_state", "optimizer_state", "read_extra", "resolve_checkpoint",
           "restore_checkpoint", "save_checkpoint", "saved_config", "UPCYCLED", "WEIGHTS_ONLY"]
