"""The layout as the training loop sees it: which model parts this rank holds, how a step's
forward/backward runs, and how gradients and metrics are reduced.

The parts come from ``moe.parallel.parallelize.parallelize`` (the one place parallelism is
applied, in a fixed order); one process is the layout with every size 1 (no mesh).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn

from moe.config import Config
from moe.model.loss import lm_loss
from moe.model.moe import MoE
from moe.optim import micro_batches
from moe.parallel import grads as dp_ops
from moe.parallel.mesh import ParallelDims
from moe.parallel.parallelize import parallelize
from moe.train.metrics import RoutingAccumulator

__all__ = ["ShardedModel", "moe_layer_names"]


def moe_layer_names(cfg: Config) -> list[str]:
    return [str(i) for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]


class ShardedModel:
    def __init__(self, cfg: Config, model: nn.Module, dims: ParallelDims | None = None,
                 device: torch.device | None = None,
                 autocast: Callable[[], AbstractContextManager] | None = None):
        self.cfg = cfg
        self.dims = dims or ParallelDims()
        self.mesh = self.dims.mesh()
        self.device = device or torch.device("cpu")
        self.autocast = autocast or contextlib.nullcontext
        self.pipeline = None
        self.rank = dist.get_rank() if self.mesh is not None else 0
        self.data_rank = 0
        if self.mesh is not None:
            self.data_rank = (self.dims.mesh("dp").get_local_rank() * self.dims.ep
                              + self.dims.mesh("ep").get_local_rank())
        done = parallelize(model, self.dims, cfg, self.device, log=False)
        self.parts: list[nn.Module] = done.parts
        self.stage_ids = done.stage_ids
        self._forward = self.parts[0]  # torch.compile'd by compile(); parts keep their names
        steps = done.steps
        if self.dims.pp > 1:
            from moe.parallel.pipeline import Pipeline

            local = cfg.train.batch_size // self.dims.data_shards
            n_micro = self.dims.pp_microbatches(cfg)
            if cfg.parallel.pp_microbatches is None:
                steps.append(f"pipeline: {n_micro} micro-batches of {local // n_micro} "
                             f"sequences (chosen: parallel.pp_microbatches unset)")
            self.n_micro = n_micro
            self.pipeline = Pipeline(
                list(zip(self.stage_ids, self.parts)), self.dims.mesh("pp"), cfg,
                (local // n_micro, cfg.data.seq_len), n_micro, self.device,
                global_batch=cfg.train.batch_size, on_moe_forward=self._on_moe_forward,
                autocast=self.autocast)
        if self.mesh is not None and self.rank == 0:
            print(f"parallelize ({self.dims.describe()}): " + "; ".join(steps), file=sys.stderr)

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
        for part in self.parts:
            part.set_loss_scale(share)

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

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, routing: RoutingAccumulator,
                         inputs: dict[str, torch.Tensor] | None = None,
                         n_targets: int | None = None,
                         target_weights: torch.Tensor | None = None) -> float:
        """Forward and backward of one global batch; gradients accumulate in the parts.

        ``inputs``: further model inputs batched like ``x`` (the vision model's ``images`` and
        ``media_pos``), cut into the same micro-batches. ``n_targets``: the number of targets
        in the GLOBAL batch that count (the rest are ``IGNORE_INDEX``): the loss is the sum of
        their cross-entropies over it, so a token weighs the same in any micro-batch on any
        layout; None: every target counts and each micro-batch's mean weighs its share of
        sequences (the text LM, where the two are the same). ``target_weights`` (float
        [batch, seq], with ``n_targets``; 0 on ignored targets): the gradient is that of
        the weighted mean, sum(w * ce) / sum(w) over the global batch, while the returned
        loss stays the unweighted one (so logged losses compare with unweighted runs).
        Returns this rank's share-weighted LM loss (0 on ranks without the last stage).
        """
        batch = x.shape[0]
        weight_total = None if target_weights is None else float(target_weights.sum())
        if target_weights is not None:
            if n_targets is None:
                raise ValueError("target_weights need n_targets")
            target_weights = self.local_batch(target_weights)
        x, y = self.local_batch(x), self.local_batch(y)
        inputs = {k: self.local_batch(v) for k, v in (inputs or {}).items()}
        self._routing = routing
        total = 0.0
        if self.pipeline is not None:
            if inputs or n_targets is not None or target_weights is not None:
                raise ValueError("pipeline parallelism runs the text LM only")
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
                extra = {k: v[lo:lo + mb].to(self.device, non_blocking=True)
                         for k, v in inputs.items()}
                self.set_loss_scale(share)
                with self.autocast():
                    logits = self._forward(xb, **extra)
                if target_weights is not None:
                    wb = target_weights[lo:lo + mb].to(self.device).flatten()
                    ce = lm_loss(logits, yb, reduction="none")  # [mb * seq], 0 where ignored
                    (ce @ wb / max(weight_total, 1e-12)).backward()
                    total += float(ce.detach().sum()) / max(n_targets, 1)
                    routing.add(layers, share)
                    continue
                if n_targets is None:
                    loss, weight = lm_loss(logits, yb), share
                else:
                    loss, weight = lm_loss(logits, yb, reduction="sum"), 1 / max(n_targets, 1)
                (loss * weight).backward()  # router losses inject their own gradient (moe.py)
                total += weight * float(loss.detach())
                routing.add(layers, share)
        self._routing = None
        return total

    @property
    def forward(self) -> nn.Module:
        """The model call of a single-stage layout (compiled after ``compile()``)."""
        return self._forward

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
        """Mean LM loss per target token over fixed batches in eval mode (eval capacity
        factor): each batch weighs its number of sequences, so how the validation set is cut
        into batches does not change the number. Every rank runs every batch (expert and tensor
        parallel forwards need all ranks) and returns the same number.

        ``last_eval_se`` is then the standard error of that mean estimated from the batches'
        spread (the evaluation noise an ablation weighs against its seed noise; nan with one
        batch)."""
        self.train(False)
        total, rows, per_batch = 0.0, 0, []
        for x, y in batches:
            if self.pipeline is not None:
                from moe.parallel.pipeline import pipeline_forward

                logits = pipeline_forward(self.pipeline, x.to(self.device))
            else:
                with self.autocast():
                    logits = self._forward(x.to(self.device))
            loss = lm_loss(logits, y.to(self.device)) if logits is not None else None
            value = self._from_last_stage(loss)
            per_batch.append((value, x.shape[0]))
            total += value * x.shape[0]
            rows += x.shape[0]
        self.train(True)
        self.last_eval_se = weighted_mean_se(per_batch)
        return total / rows

    def _from_last_stage(self, loss) -> float:
        if self.mesh is None or self.dims.pp == 1:
            return float(loss)
        t = torch.zeros(1, dtype=torch.float64, device=self._metric_device())
        if loss is not None:
            t += float(loss)
        dist.all_reduce(t, group=self.dims.mesh("pp").get_group())
        return float(t)


def weighted_mean_se(values: list[tuple[float, int]]) -> float:
    """Standard error of the weighted mean of (value, weight) pairs from their spread:
    sqrt(n / (n - 1) * sum(w^2 (v - m)^2)) / sum(w); nan for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.nan
    w = sum(wi for _, wi in values)
    m = sum(v * wi for v, wi in values) / w
    return math.sqrt(n / (n - 1) * sum((wi * (v - m)) ** 2 for v, wi in values)) / w


def _offsets(sizes: list[int]):
    lo = 0
    for n in sizes:
        yield lo, n
        lo += n
