"""The learning-rate schedule, the batch-size ramp-up and the micro-batch split: functions of
the config (and the step or tokens seen) alone, never of the layout."""

from __future__ import annotations

import math

from moe.config import TrainConfig


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
