"""``parallel:``: the tp x pp x dp x ep layout, its schedule and backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe.config.fields import ConfigError, choice, positive


@dataclass
class ParallelConfig:
    SECTION: ClassVar[str] = "parallel"
    # tp * pp * dp * ep must equal the world size. Data is split over dp * ep ranks (expert
    # parallel ranks hold different experts and see different data); experts are split over ep.
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    # Micro-batches per step and data rank under pipeline parallelism; null: the local batch
    # divided by train.micro_batch_size.
    pp_microbatches: int | None = None
    pp_stages_per_rank: int = 2  # virtual stages per rank for interleaved_1f1b
    pp_layers: list | None = None  # layers per stage, e.g. [1, 3]; null: as even as possible
    # What the data-parallel replicas of a parameter shard: none; zero1 (AdamW state: ZeRO
    # stage 1, moe/optim/zero.py); fsdp (parameters, gradients and AdamW state: FSDP2's
    # fully_shard, moe/parallel/fsdp.py).
    dp_shard: str = "none"
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # Collective timeout: bounds a rank that hangs without dying (a dead rank is noticed at
    # once on one node: gloo / torchrun's agent stop the others; docs/distributed.md,
    # "Elastic restarts").
    timeout_s: int = 600

    def validate(self) -> None:
        positive(self, "tp", "pp", "dp", "ep", "pp_stages_per_rank", "timeout_s")
        choice(self, "pp_schedule", ("gpipe", "1f1b", "interleaved_1f1b"))
        choice(self, "backend", ("auto", "gloo", "nccl"))
        choice(self, "dp_shard", ("none", "zero1", "fsdp"))
        if self.pp_microbatches is not None and self.pp_microbatches <= 0:
            raise ConfigError(f"parallel.pp_microbatches={self.pp_microbatches} must be > 0")
        if self.pp_layers is not None and (
                not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                        for n in self.pp_layers)):
            raise ConfigError(f"parallel.pp_layers={self.pp_layers} must be a list of positive "
                              f"layer counts, one per pipeline stage")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.ep
