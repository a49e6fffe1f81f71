"""``train.init_from``: a new run that starts from a trained model's weights.

The long-context recipe (docs/long_context.md): pre-train at a short context, then fine-tune
the same weights at a longer one with ``model.rope_scaling``. Unlike a resume, the new run
gets a fresh AdamW state, learning-rate schedule, data position and step count, and may change
exactly the keys an extension needs:

    model.max_seq_len, model.rope_scaling, data.seq_len    (rotary tables only: not weights)
    data.cache_dir                                          (where the same token cache lives)
    train.*                                                 (batch, schedule, lr, steps, ...)

Every other ``model.*`` or ``data.*`` key that differs from the checkpoint's config changes the
weights' shapes, what they compute, or the tokenizer, and is refused with one line naming each
key (and both values). The weights load through ``restore_checkpoint`` into this run's layout
(any tp x pp x dp x ep: the checkpoint's own layout does not matter).

A checkpoint already in ``train.run_dir`` wins: the run resumes from it and ``init_from`` is
not read again (a fine-tune that was interrupted continues where it stopped).

An imported model (``moe-import-hf DIR --out RUN``, then ``init_from: RUN``; or ``init_from:
hf:DIR``, which imports DIR once into ``<data.cache_dir>/hf-import-<fingerprint>``,
moe/hf/import_hf.py) was trained with its own tokenizer on its own data: only its ``model.*``
keys are compared (the import's data section is a placeholder), and the run must tokenise with
its tokenizer (``data.tokenizer``, e.g. ``RUN/tokenizer.json``).

``init_from: upcycle:SOURCE`` (our dense run or step folder, or a Hugging Face Llama / Qwen2
folder) starts an MoE run from the dense model's upcycle, made once into
``<data.cache_dir>/upcycle-<fingerprint>`` (moe/upcycle/cached.py): this run's ``model.*``
keys are the upcycled model's, and only the MoE layer's keys may differ from the source's
(the experts' number and size, so the granularity, top-k, routing, capacity, balancing).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from moe.checkpoint import (
    IMPORTED,
    CheckpointError,
    read_extra,
    resolve_checkpoint,
    restore_checkpoint,
)
from moe.config import Config, ConfigError, saved_differences

HF_PREFIX = "hf:"  # train.init_from: hf:DIR, a Hugging Face folder (moe/hf/import_hf.py)
UPCYCLE_PREFIX = "upcycle:"  # train.init_from: upcycle:SOURCE (moe/upcycle/cached.py)

# The keys that may differ from the checkpoint's config (train.* always may).
ALLOWED = ("model.max_seq_len", "model.rope_scaling", "data.seq_len", "data.cache_dir",
           "data.val_windows")


# A vision source's encoder, resampler and cross-attention come along: the settings that shape
# them must match (what only steers training or the generated data may change).
VISION_ARCHITECTURE = ["vision.image_size", "vision.patch_size", "vision.d_vision",
                       "vision.encoder_layers", "vision.encoder_heads", "vision.n_latents",
                       "vision.resampler_layers", "vision.cross_attn_every",
                       "vision.cross_attn_ffn_mult", "vision.attend"]


def init_config_problems(saved: dict, cfg: Config, imported: bool = False) -> list[str]:
    """``"key (saved -> now)"`` for each refused difference: a model/data key outside
    ``ALLOWED`` (model keys only from an ``imported`` model), and, from a vision run into a
    vision run, a vision key that shapes the weights (``VISION_ARCHITECTURE``)."""
    keys = ["model"] if imported else ["model", "data"]
    if (saved.get("vision") or {}).get("enabled") and cfg.vision.enabled:
        keys += VISION_ARCHITECTURE
    return [f"{key} ({old!r} -> {now!r})" for key, old, now in saved_differences(saved, cfg, keys)
            if key not in ALLOWED]


def check_init_config(saved: dict, cfg: Config, source: Path, imported: bool = False) -> None:
    """ConfigError (one line) naming every refused difference, and, from an ``imported``
    model, a run that would tokenise with anything but a given tokenizer."""
    if imported and not cfg.data.tokenizer:
        raise ConfigError(f"train.init_from={cfg.train.init_from} is an imported model with "
                          f"its own tokenizer: set data.tokenizer to it (e.g. "
                          f"{source.parent.parent / 'tokenizer.json'})")
    diffs = init_config_problems(saved, cfg, imported)
    if diffs:
        raise ConfigError(f"train.init_from={cfg.train.init_from}: this run changes "
                          f"{', '.join(diffs)} from {source}; init_from allows only "
                          f"{', '.join(ALLOWED)} and train.* to change: use the checkpoint's "
                          "values (its run folder's config.yaml)")


def resolve_init_from(cfg: Config, mesh=None) -> Path:
    """The checkpoint folder ``train.init_from`` names (a run folder: its newest good one),
    its config checked against ``cfg``. Collective with a mesh: rank 0 resolves, every rank
    gets its answer or its error."""
    out: list = [None]
    init = cfg.train.init_from
    if mesh is None or dist.get_rank() == 0:
        try:
            if init.startswith(HF_PREFIX):  # imported once, then read from the cache
                from moe.hf.import_hf import import_cached

                out[0] = ("ok", resolve_checkpoint(import_cached(init[len(HF_PREFIX):],
                                                                 cfg.data.cache_dir)))
            elif init.startswith(UPCYCLE_PREFIX):  # upcycled once, then read from the cache
                from moe.upcycle import upcycle_cached

                model_keys = tuple(k for k in ALLOWED if k.startswith("model."))
                out[0] = ("ok", resolve_checkpoint(upcycle_cached(init[len(UPCYCLE_PREFIX):],
                                                                  cfg, model_keys)))
            else:
                out[0] = ("ok", resolve_checkpoint(init))
        except (FileNotFoundError, CheckpointError) as e:
            out[0] = ("error", f"{e} (train that run first, or name a run folder or step_* "
                               "folder that has one)")
        except ValueError as e:  # the import or upcycle refused (HFImportError, UpcycleError)
            out[0] = ("error", str(e))
    if mesh is not None:
        dist.broadcast_object_list(out, src=0)
    kind, value = out[0]
    if kind == "error":
        raise ConfigError(f"train.init_from={init}: {value}")
    source = Path(value)
    extra = read_extra(source)
    check_init_config(extra["config"], cfg, source, imported=IMPORTED in extra)
    return source


def load_init_weights(source: Path, parts, mesh=None, main: bool = True,
                      keep: Callable[[str], bool] | None = None) -> int:
    """Copy the weights of ``source`` into ``parts`` (this rank's model or stage modules, in
    this run's layout); no optimizer state. Returns the source's training step.

    ``keep(name)``: parameters the source may lack, left as initialised (a vision run started
    from a text run: its vision parts, moe/vision/model.py); every other one must be there."""
    extra = restore_checkpoint(source, parts, None, mesh, missing_ok=keep)
    step = int(extra.get("step", 0))
    if main:
        print(f"init_from: weights of {source} (trained {step} steps); fresh optimizer, "
              "schedule and data position", file=sys.stderr)
    return step
