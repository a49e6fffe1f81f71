"""Decoding across ranks: rank 0 drives, every other rank follows its commands.

    sharded = load_sharded(run, parallel)          # every rank (moe/inference/sharded.py)
    if sharded.is_driver:
        with Driver(sharded) as driver:            # the followers stop when it closes
            engine = driver.engine(n_slots=4)      # an Engine: generate, Scheduler, server
            ...
    else:
        follow(sharded)                            # runs rank 0's steps until it closes

Rank 0 owns the tokenizer, the sampling and (moe-serve) the HTTP server; it runs the one-
process code (``Engine.stream``, the ``Scheduler``, the server's engine loop) on a
``DistributedEngine``, whose only difference is ``forward``: before each step it broadcasts
the step to the other ranks, then every rank runs its part of the same forward (tensor ranks
all-reduce inside it, pipeline stages pass hidden states, expert ranks exchange tokens), and
the logits come back to rank 0 (moe/inference/sharded.py ``StagedModel``). Only rank 0
samples, so every rank agrees on the next token without drawing it.

The protocol (int64 tensors broadcast from rank 0 on a gloo group of their own, so a GPU job
waits for commands on the CPU and a server may idle up to ``COMMAND_TIMEOUT`` while the
model's collectives keep ``parallel.timeout_s``):

    header [op, B, S]                   op: FORWARD, OPEN or CLOSE
    FORWARD payload [3B + B*S]          slots, each slot's length before the step, n_valid,
                                        tokens (row-major [B, S])
    OPEN (an object broadcast)          the new engine's n_slots, max_len, capacity_factor,
                                        decode_path, cache dtype

A step carries each slot's length, so a follower's cache is set to the driver's before every
forward: resets, truncations and refills (continuous batching) need no message of their own.
Whatever the driver refuses (a bad prompt, a full slot) it refuses before broadcasting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe.inference.engine import Engine
from moe.inference.sharded import LoadedShards

FORWARD, OPEN, CLOSE = 1, 2, 3


class Driver:
    """Rank 0's side: opens engines and, on ``close`` (or leaving the ``with``), stops the
    followers, whatever happened before (an error on rank 0 must not leave them waiting)."""

    def __init__(self, sharded: LoadedShards):
        if not sharded.is_driver:
            raise ValueError(f"rank {sharded.rank} follows (moe.inference.distributed.follow); "
                             "only rank 0 drives")
        self.sharded, self.group, self.closed = sharded, sharded.command_group, False

    def engine(self, n_slots: int = 1, max_len: int | None = None, *,
               capacity_factor: float | None = None, decode_path: bool = True,
               dtype: torch.dtype | None = None) -> DistributedEngine:
        """A new engine (its KV cache on every rank); the previous one must not be used."""
        geometry = dict(n_slots=n_slots, max_len=max_len, capacity_factor=capacity_factor,
                        decode_path=decode_path, dtype=dtype)
        engine = DistributedEngine(self, self.sharded.model, **geometry)  # checks first
        self.send(OPEN)
        dist.broadcast_object_list([geometry], src=0, group=self.group)
        return engine

    def send(self, op: int, b: int = 0, s: int = 0) -> None:
        dist.broadcast(torch.tensor([op, b, s]), src=0, group=self.group)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.send(CLOSE)

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistributedEngine(Engine):
    """An ``Engine`` whose every forward runs on all ranks (made by ``Driver.engine``)."""

    def __init__(self, driver: Driver, model, **kwargs):
        super().__init__(model, **kwargs)
        self.driver = driver

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], tokens: torch.Tensor,
                n_valid: Sequence[int] | None = None) -> torch.Tensor:
        if self.driver.closed:
            raise RuntimeError("the followers have stopped (Driver.close): no more steps")
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2 or tokens.shape[0] != len(slots):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} for {len(slots)} slots: "
                             "want [len(slots), S]")
        b, s = tokens.shape
        self.cache.view(slots, s)  # raises here, before the followers hear of the step
        n_valid = [s] * b if n_valid is None else list(n_valid)
        starts = [self.cache.lengths[i] for i in slots]
        self.driver.send(FORWARD, b, s)
        payload = torch.cat([torch.tensor([*slots, *starts, *n_valid]),
                             tokens.reshape(-1).to("cpu", torch.long)])
        dist.broadcast(payload, src=0, group=self.driver.group)
        return super().forward(slots, tokens, n_valid)


def follow(sharded: LoadedShards) -> int:
    """A follower's loop: run rank 0's steps on this rank's part until it closes; returns
    the number of forward steps run."""
    group, engine, steps = sharded.command_group, None, 0
    header = torch.zeros(3, dtype=torch.long)
    while True:
        dist.broadcast(header, src=0, group=group)
        op, b, s = header.tolist()
        if op == CLOSE:
            return steps
        if op == OPEN:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            engine = Engine(sharded.model, **box[0])
        elif op == FORWARD:
            payload = torch.empty(3 * b + b * s, dtype=torch.long)
            dist.broadcast(payload, src=0, group=group)
            slots, starts, n_valid = payload[:3 * b].view(3, b).tolist()
            for slot, start in zip(slots, starts):
                engine.cache.lengths[slot] = start
            engine.forward(slots, payload[3 * b:].view(b, s), n_valid)
            steps += 1
        else:
            raise RuntimeError(f"unknown command {op} from rank 0")
