"""The optimizer and the schedules:

    adamw.py      parameter groups (no decay on norms, biases, embeddings), AdamW settings
    zero.py       ZeRO-1: AdamW state sharded over each parameter's data-parallel replicas
    build.py      build_optimizer: AdamW, or ZeRO-1's with a mesh
    schedule.py   warmup + cosine learning rate, batch-size ramp-up, micro-batch split
"""

from moe.optim.adamw import adamw_kwargs, apply_hyperparameters, param_groups
from moe.optim.build import build_optimizer
from moe.optim.schedule import batch_size_at, lr_at, micro_batches

__all__ = ["adamw_kwargs", "apply_hyperparameters", "batch_size_at", "build_optimizer", "lr_at",
           "micro_batches", "param_groups"]
