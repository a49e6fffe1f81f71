"""A trained model loaded into a tensor x pipeline (x expert) layout for decoding under torchrun.

    sharded = load_sharded("runs/tiny", ["--parallel.tp=2", "--parallel.pp=2"])   # every rank
    sharded.model      # StagedModel: this rank's stage, shards of the training plan
    sharded.is_driver  # rank 0: owns the tokenizer, the sampling and the HTTP server

The layout is the training one, applied by the same code: ``parallelize`` (moe/parallel/
parallelize.py) cuts the model by the sharding plan (moe/parallel/plan.py): each tensor rank
keeps its query heads and KV heads (multi-query attention's one K/V head is replicated over
tensor ranks, as in training), each pipeline rank the whole layers of its stage, each expert
rank its experts. A step folder's weights then load through ``restore_checkpoint`` (DCP
reads each rank's slice, whatever layout saved it: the resume path); a consolidated file is
read whole on every rank and cut by the same ``parallelize`` (a built model keeps its values).
The KV cache follows (moe/inference/cache.py reads the head count from the sharded ``wk``),
so a rank caches only its own heads of its own layers.

Only ``--parallel.*`` keys may be given (``parallel_settings``): the model is the
checkpoint's. Refused with a one-line ``ConfigError``: ``parallel.dp`` > 1 (every replica
would decode the same tokens: run one server per replica), an interleaved pipeline schedule
(a decode step is one micro-batch through one stage per rank), a vision model (vision runs
are never split over tp or pp), and a layout the model cannot split
(``ParallelDims.validate_layout``: the training stack's own errors, e.g. model.n_heads not
divisible by parallel.tp).

``StagedModel`` is what the engine runs: this rank's stage, called like the full
``Transformer``. A step passes the hidden states [B, S, dim] stage to stage with one send and
one receive per stage boundary (the batch is one micro-batch: a decode step is a single token
per sequence, so cutting it into micro-batches would only add messages; the stages idle in
turn, which is the price of pipeline parallelism at batch 1, paid for memory), and the last
stage sends the logits [B, S, vocab] to rank 0, the only rank that samples.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moe.checkpoint import load_model, resolve_checkpoint, restore_checkpoint, saved_config
from moe.checkpoint.load import is_consolidated_file
from moe.config import Config, ConfigError, ParallelConfig
from moe.config.load import apply_overrides
from moe.model import build_model
from moe.parallel.launch import init_distributed
from moe.parallel.mesh import ParallelDims
from moe.parallel.parallelize import parallelize

# The followers wait for rank 0's next command on a group of their own (moe/inference/
# distributed.py) for as long as a server idles: this bounds that wait, not a decode step.
COMMAND_TIMEOUT = timedelta(days=7)


def is_launched() -> bool:
    """Under torchrun (or any launcher that sets RANK): the layout path, even for one rank."""
    import os

    return "RANK" in os.environ


def parallel_settings(args: list[str]) -> ParallelConfig:
    """The ``--parallel.key=value`` arguments of an inference command as a validated
    ``ParallelConfig``; ConfigError naming anything else (the model, data and training
    settings are the checkpoint's)."""
    cfg = Config()
    for arg in args:
        if not arg.startswith("--parallel."):
            raise ConfigError(f"unrecognized argument {arg!r}: an inference command takes "
                              f"--parallel.key=value settings only (the model is the "
                              f"checkpoint's)")
        apply_overrides(cfg, [arg])
    cfg.parallel.validate()
    return cfg.parallel


@dataclass
class LoadedShards:
    """This rank's part of a trained model in a layout, and where it came from."""

    model: StagedModel
    cfg: Config  # the checkpoint's config, with the layout's parallel section
    dims: ParallelDims
    device: torch.device
    checkpoint: Path
    step: int
    tokenizer: Path | None
    command_group: object  # the gloo group rank 0's commands travel on

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def inference_config(cfg: Config, parallel: ParallelConfig, device: str = "auto") -> Config:
    """The checkpoint's ``cfg`` with the layout ``parallel`` and nothing of training's that
    would change a forward (activation checkpointing); ConfigError for a refused layout."""
    cfg = dataclasses.replace(cfg, parallel=parallel,
                              train=dataclasses.replace(cfg.train, device=device,
                                                        activation_checkpointing="none"))
    cfg.validate()
    p = cfg.parallel
    if p.dp > 1:
        raise ConfigError(f"parallel.dp={p.dp}: data-parallel replicas would each decode the "
                          f"same tokens; run one server per replica (tp, pp and ep split a "
                          f"model for decoding)")
    if p.pp > 1 and p.pp_schedule == "interleaved_1f1b":
        raise ConfigError("parallel.pp_schedule=interleaved_1f1b: decoding runs one stage per "
                          "rank (a step is one micro-batch); leave pp_schedule unset")
    if p.dp_shard != "none":
        raise ConfigError(f"parallel.dp_shard={p.dp_shard} shards training state over data "
                          f"ranks; decoding has none")
    if cfg.vision.enabled and ParallelDims.from_config(cfg).world_size > 1:
        raise ConfigError("a vision model decodes in one process (vision runs are never "
                          "split over tp or pp)")
    return cfg


def load_sharded(path: str | Path, parallel: ParallelConfig, device: str = "auto",
                 script: str = "scripts/generate.py") -> LoadedShards:
    """Every rank: start the process group from torchrun's environment, build this rank's
    part of the model of ``path`` (a run folder, a step folder or a consolidated file) in the
    layout ``parallel`` and load its weights; see the module doc. Collective. Without
    torchrun: ConfigError saying how to launch ``script``."""
    path = Path(path)
    loaded = None
    if is_consolidated_file(path):
        loaded = load_model(path)
        saved, step, tokenizer, checkpoint = loaded.cfg, loaded.step, loaded.tokenizer, path
    else:
        checkpoint = resolve_checkpoint(path)
        saved, step, tokenizer = saved_config(checkpoint)
    cfg = inference_config(saved, parallel, device)
    if not is_launched() and ParallelDims.from_config(cfg).world_size == 1:
        raise ConfigError(f"one process: run {script} without --parallel.* (or under "
                          f"torchrun)")
    dims, dev = init_distributed(cfg, training=False, script=script)
    model = loaded.model if loaded is not None else build_model(cfg.model, "meta")
    done = parallelize(model, dims, cfg, dev, log=False)
    if loaded is None:
        restore_checkpoint(checkpoint, done.parts, None, dims.mesh())
    if dist.get_rank() == 0:  # the training log's steps, less its gradient reduction
        steps = [s for s in done.steps if not s.startswith("data:")]
        print(f"decoding {checkpoint} ({dims.describe()}): {'; '.join(steps)}; weights "
              f"loaded", file=sys.stderr)
    del loaded, model
    if len(done.parts) != 1:
        raise AssertionError(f"one stage per rank, got stages {done.stage_ids}")
    staged = StagedModel(done.parts[0].eval(), done.stage_ids[0], dims)
    group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return LoadedShards(staged, cfg, dims, dev, checkpoint, step, tokenizer, group)


class StagedModel(nn.Module):
    """This rank's pipeline stage (the whole model without a pipeline), called like the full
    ``Transformer``: ``model(tokens [B, S], kv_cache=view)`` returns the logits [B, S, vocab]
    on rank 0 and on the last stage's ranks, None elsewhere. ``layers`` are the stage's own
    (the KV cache holds only these); ``cfg`` is the model config."""

    def __init__(self, part: nn.Module, stage: int, dims: ParallelDims):
        super().__init__()
        self.part, self.cfg, self.layers = part, part.cfg, part.layers
        self.stage, self.n_stages = stage, dims.pp
        self.peers: list[int] = []  # global rank of each stage, at this rank's tp / ep place
        if dims.pp > 1:
            self.peers = dist.get_process_group_ranks(dims.mesh("pp").get_group())

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype: the blocks' weights' (fp32, or bf16 for serving)."""
        return next(iter(self.layers.values())).attention_norm.weight.dtype

    def forward(self, tokens: torch.Tensor, kv_cache=None, **kwargs) -> torch.Tensor | None:
        if self.n_stages == 1:
            return self.part(tokens, kv_cache, **kwargs)
        b, s = tokens.shape[:2]
        first, last = self.stage == 0, self.stage == self.n_stages - 1
        x = tokens
        if not first:
            x = torch.empty(b, s, self.cfg.d_model, dtype=self.dtype, device=tokens.device)
            dist.recv(x, src=self.peers[self.stage - 1])
        out = self.part(x, kv_cache, **kwargs)
        if not last:
            dist.send(out.contiguous(), dst=self.peers[self.stage + 1])
        elif self.peers[0] == 0:  # the pipeline of rank 0: it samples from these logits
            dist.send(out.contiguous(), dst=0)
        if first and self.peers[0] == 0:
            out = torch.empty(b, s, self.cfg.vocab_size, dtype=self.dtype, device=tokens.device)
            dist.recv(out, src=self.peers[-1])
            return out
        return out if last else None
