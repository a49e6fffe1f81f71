"""Optimizer, learning-rate schedule and batch-size ramp-up."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe.config import TrainConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def param_groups(model: nn.Module | list[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and the input embedding.

    Norm weights and biases are 1-D; the embedding is named ``tok_embeddings`` (module names are
    an API). A tied output head shares the embedding and so is not decayed either.
    ``model`` may be a list of parts (pipeline stages held by one rank).
    """
    parts = model if isinstance(model, list) else [model]
    decay, no_decay, seen = [], [], set()
    for name, p in ((n, p) for part in parts for n, p in part.named_parameters()):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or name.startswith("tok_embeddings"):
            no_decay.append(p)
        else:
            decay.append(p)
    # "decay" names the group for apply_hyperparameters (AdamW ignores the extra key).
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def adamw_kwargs(cfg: TrainConfig) -> dict:
    """AdamW hyper-parameters and kernel (``train.optimizer_impl``).

    Measured on 2 CPU cores, 29 M fp32 parameters, best of 5 steps: fused 15 ms, for-loop
    45-74 ms (torch's default for CPU tensors; two measurements), foreach 83 ms. The MoE's
    expert weights make the optimizer a large part of a CPU step, so fused is the default.
    """
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for-loop": {"foreach": False}}[cfg.optimizer_impl]
    return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **impl}


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> list[str]:
    """Set the config's AdamW settings on every group, replacing what a resumed checkpoint
    restored; returns one ``"train.key: old -> new"`` line per setting that changed.

    lr is not here: the schedule sets it every step. The kernel (``optimizer_impl``) is never
    restored from a checkpoint, so it is the config's already.
    """
    changes: dict[str, str] = {}
    for group in optimizer.param_groups:
        want = {"weight_decay": cfg.weight_decay if group.get("decay", True) else 0.0,
                "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
        old = (group.get("weight_decay"), tuple(group.get("betas", ())), group.get("eps"))
        if group.get("decay", True) and old[0] != want["weight_decay"]:
            changes["weight_decay"] = f"train.weight_decay: {old[0]} -> {cfg.weight_decay}"
        for i, key in enumerate(("beta1", "beta2")):
            if len(old[1]) == 2 and old[1][i] != want["betas"][i]:
                changes[key] = f"train.{key}: {old[1][i]} -> {want['betas'][i]}"
        if old[2] != want["eps"]:
            changes["eps"] = f"train.eps: {old[2]} -> {cfg.eps}"
        group.update(want)
    return list(changes.values())


def build_optimizer(model: nn.Module | list[nn.Module], cfg: TrainConfig,
                    mesh: DeviceMesh | None = None, zero1: bool = False) -> torch.optim.AdamW:
    """The one optimizer builder: AdamW, or with ``zero1`` and a mesh ZeRO-1's AdamW whose
    state is sharded over each parameter's data-parallel replicas (moe/parallel/zero.py)."""
    if zero1 and mesh is not None:
        from moe.parallel.zero import ZeroOneAdamW

        return ZeroOneAdamW(model if isinstance(model, list) else [model], cfg, mesh)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_kwargs(cfg))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at
    ``decay_steps`` (default ``max_steps``), flat after. ``step`` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = cfg.decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * coeff)


def batch_size_at(tokens_seen: int, tc: TrainConfig, group_seqs: int) -> int:
    """Global batch (sequences) for the next step: a function of the config and the tokens
    seen, never of the layout, so every layout and every resume trains on the same batches.

    Ramp-up (as reported for GPT-4 and used by GPT-3; Megatron's ``--rampup-batch-size start
    increment samples``): the batch grows linearly from ``batch_ramp_start`` (0: one increment)
    to ``batch_size`` over the first ``batch_ramp_tokens`` tokens, in whole steps of
    ``tc.ramp_increment`` sequences above the start. ``ParallelDims.validate`` refuses a start or
    increment that the layout's data ranks cannot split into whole capacity groups.
    """
    if tc.batch_ramp_tokens <= 0 or tokens_seen >= tc.batch_ramp_tokens:
        return tc.batch_size
    inc = tc.ramp_increment(group_seqs)
    start = tc.batch_ramp_start or inc
    grown = (tc.batch_size - start) * tokens_seen // tc.batch_ramp_tokens  # exact, in integers
    return min(tc.batch_size, start + grown // inc * inc)


def micro_batches(batch: int, micro: int) -> list[int]:
    """Split a global batch into micro-batches of at most ``micro`` sequences."""
    sizes = [micro] * (batch // micro)
    if batch % micro:
        sizes.append(batch % micro)
    return sizes
