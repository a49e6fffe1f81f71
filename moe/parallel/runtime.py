"""The layout as the training loop sees it: which model parts this rank holds, how a step's
forward/backward runs, and how gradients and metrics are reduced.

One process is the trivial layout (mesh None). Otherwise ``parallelize`` applies parallelism to
a model built on the meta device (shapes only) on every rank, in a fixed order, logged once:

    1. pipeline: keep this rank's stages (pruned copies of the model)
    2. tensor:   split heads and expert hidden dims over tp, insert Megatron's f / g
    3. expert:   partition experts over ep, all-to-all token exchange
    4. materialise this rank's shards on its device, each value drawn from a generator seeded
       by (train.seed, parameter name): the weights of one process, whatever the layout
    5. data:     gradients summed over data ranks after backward (moe/parallel/data.py)
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.config import Config
from moe.metrics import RoutingAccumulator
from moe.model.init import materialize
from moe.model.moe import MoE
from moe.optim import micro_batches
from moe.parallel import data as dp_ops
from moe.parallel.mesh import ParallelDims, shard_slices


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def moe_layer_names(cfg: Config) -> list[str]:
    return [str(i) for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]


class Runtime:
    def __init__(self, cfg: Config, model: nn.Module, mesh=None, device=None,
                 autocast=None):
        import contextlib

        self.cfg = cfg
        self.mesh = mesh
        self.device = device or torch.device("cpu")
        self.autocast = autocast or contextlib.nullcontext
        self.dims = ParallelDims.from_config(cfg)
        self.pipeline = None
        self.parts: list[nn.Module] = [model]
        self._forward = model  # torch.compile'd by compile(); parts keep their names
        self.rank = dist.get_rank() if mesh is not None else 0
        if mesh is not None:
            self.data_rank = (mesh["dp"].get_local_rank() * self.dims.ep
                              + mesh["ep"].get_local_rank())
        else:
            self.data_rank = 0
        if mesh is not None:
            self._parallelize(model)
        else:
            self._place(model)
        # Every layout, one process included: after tensor / expert parallel, before compile.
        from moe.parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(self.parts, cfg.train.activation_checkpointing)

    # -- set-up --------------------------------------------------------------------------
    def _place(self, part: nn.Module) -> None:
        """Materialise a meta-device part (this rank's shards only) or move a built one."""
        if any(p.is_meta for p in part.parameters()):
            materialize(part, self.device, self.cfg.train.seed, shard_slices)
        else:
            part.to(self.device)

    def _parallelize(self, model: nn.Module) -> None:
        cfg, mesh, dims = self.cfg, self.mesh, self.dims
        steps = []
        if dims.pp > 1:
            from moe.parallel.pipeline import build_stage_models

            staged = build_stage_models(model, mesh["pp"].get_local_rank(), dims.pp, cfg)
            self.stage_ids = [s for s, _ in staged]
            self.parts = [m for _, m in staged]
            steps.append(f"pipeline: stages {self.stage_ids} of {dims.pp} ranks "
                         f"({cfg.parallel.pp_schedule})")
        if dims.tp > 1:
            from moe.parallel.tensor import apply_tensor_parallel

            for part in self.parts:
                apply_tensor_parallel(part, mesh["tp"])
            steps.append(f"tensor: tp={dims.tp}")
        if dims.ep > 1:
            from moe.parallel.expert import apply_expert_parallel

            for part in self.parts:
                apply_expert_parallel(part, mesh["ep"])
            steps.append(f"expert: ep={dims.ep}")
        for part in self.parts:
            self._place(part)
        steps.append(f"materialise on {self.device} (seed {cfg.train.seed})")
        steps.append(f"data: gradients summed over dp x ep = {dims.data_shards} ranks")
        if dims.pp > 1:
            from moe.parallel.pipeline import PipelineRuntime

            local = cfg.train.batch_size // dims.data_shards
            n_micro = dims.pp_microbatches(cfg)
            if cfg.parallel.pp_microbatches is None:
                steps.append(f"pipeline: {n_micro} micro-batches of {local // n_micro} "
                             f"sequences (chosen: parallel.pp_microbatches unset)")
            self.n_micro = n_micro
            self.pipeline = PipelineRuntime(
                list(zip(self.stage_ids, self.parts)), mesh["pp"], cfg,
                (local // n_micro, cfg.data.seq_len), n_micro, self.device,
                global_batch=cfg.train.batch_size, on_moe_forward=self._on_moe_forward,
                autocast=self.autocast)
        if self.rank == 0:
            print(f"parallelize ({dims.describe()}): " + "; ".join(steps), file=sys.stderr)

    def compile(self) -> None:
        """Compile the single-stage forward (pipeline stages run uncompiled)."""
        if self.pipeline is None:
            self._forward = torch.compile(self.parts[0])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def moe_layers(self) -> dict[str, MoE]:
        out = {}
        for part in self.parts:
            for name, layer in part.layers.items():
                if isinstance(layer.feed_forward, MoE):
                    out[name] = layer.feed_forward
        return out

    def set_loss_scale(self, share: float) -> None:
        for layer in self.moe_layers().values():
            layer.loss_scale = share

    def parameters(self):
        return [p for part in self.parts for p in part.parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    # -- a step --------------------------------------------------------------------------
    def local_batch(self, x: torch.Tensor) -> torch.Tensor:
        """This data rank's slice of the global batch (contiguous sequences)."""
        n = x.shape[0] // self.dims.data_shards
        return x[self.data_rank * n:(self.data_rank + 1) * n]

    def _on_moe_forward(self, name: str, layer: MoE, share: float) -> None:
        if self._routing is not None and layer.training:
            self._routing.add_layer(name, layer, share)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         routing: RoutingAccumulator) -> float:
        """Forward and backward of one global batch; gradients accumulate in the parts.

        Returns this rank's share-weighted LM loss (0 on ranks without the last stage).
        """
        batch = x.shape[0]
        x, y = self.local_batch(x), self.local_batch(y)
        self._routing = routing
        total = 0.0
        if self.pipeline is not None:
            share = (x.shape[0] // self.n_micro) / batch
            self.set_loss_scale(share)
            loss = self.pipeline.step(x.to(self.device), y.to(self.device), share)
            total = 0.0 if loss is None else float(loss)
        else:
            layers = self.moe_layers()
            for lo, mb in _offsets(micro_batches(x.shape[0], self.cfg.train.micro_batch_size)):
                share = mb / batch  # token-weighted: the step's gradient is the global batch's
                xb = x[lo:lo + mb].to(self.device, non_blocking=True)
                yb = y[lo:lo + mb].to(self.device, non_blocking=True)
                self.set_loss_scale(share)
                with self.autocast():
                    logits = self._forward(xb)
                loss = lm_loss(logits, yb)
                (loss * share).backward()  # router losses inject their own gradient (moe.py)
                total += share * float(loss.detach())
                routing.add(layers, share)
        self._routing = None
        return total

    def reduce_and_clip(self, max_norm: float) -> torch.Tensor:
        dp_ops.reduce_gradients(self.parts, self.mesh)
        return dp_ops.clip_gradients(self.parts, self.mesh, max_norm)

    def reduce_step_metrics(self, lm: float, routing: RoutingAccumulator) -> float:
        """Sum the LM loss and routing statistics over ranks; returns the global LM loss."""
        if self.mesh is None:
            return lm
        flat = torch.cat([torch.tensor([lm], dtype=torch.float64), routing.pack()])
        flat = dp_ops.reduce_metrics(flat.to(self._metric_device()), self.mesh).cpu()
        routing.unpack(flat[1:])
        return float(flat[0])

    def _metric_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean LM loss over fixed batches in eval mode (eval capacity factor); every rank
        runs every batch (expert and tensor parallel forwards need all ranks) and returns
        the same number."""
        self.train(False)
        total = 0.0
        for x, y in batches:
            if self.pipeline is not None:
                from moe.parallel.pipeline import pipeline_forward

                logits = pipeline_forward(self.pipeline, x.to(self.device))
            else:
                with self.autocast():
                    logits = self._forward(x.to(self.device))
            loss = lm_loss(logits, y.to(self.device)) if logits is not None else None
            total += self._from_last_stage(loss)
        self.train(True)
        return total / len(batches)

    def _from_last_stage(self, loss) -> float:
        if self.mesh is None or self.dims.pp == 1:
            return float(loss)
        t = torch.zeros(1, dtype=torch.float64, device=self._metric_device())
        if loss is not None:
            t += float(loss)
        dist.all_reduce(t, group=self.mesh["pp"].get_group())
        return float(t)


def _offsets(sizes: list[int]):
    lo = 0
    for n in sizes:
        yield lo, n
        lo += n
