"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model is cut into stages of whole layers. Each stage module is a copy of the full
``Transformer`` with the layers it does not own deleted from ``layers`` (a ModuleDict keyed by
the global layer index) and ``tok_embeddings`` (all but the first stage) and ``norm`` / ``output``
(all but the last stage) set to None; ``Transformer.forward`` skips None modules, so parameter
names stay those of the full model (``layers.3.attention.wq.weight``) for the optimizer,
checkpoints, tensor and expert parallelism.

    stages = build_stage_models(model, pp_rank, pp, cfg)       # [(stage_index, module)]
    ... tensor / expert parallelism applied to each stage module ...
    pipe = Pipeline(stages, mesh["pp"], cfg, (mb, S), n_micro, device, global_batch=B,
                           on_moe_forward=callback)    # callback(layer_name, moe_layer, share)
    loss = pipe.step(x_local, y_local)   # last stage: sum over micro-batches of CE * share
    logits = pipeline_forward(pipe, x)   # eval: forward only, logits on the last stage

Placement. ``gpipe`` / ``1f1b``: one stage per rank, stage s on pp rank s. ``interleaved_1f1b``
(Narayanan et al. 2021, sec. 2.2): ``pp_stages_per_rank`` virtual stages per rank, stage s on pp
rank ``s % pp`` (the loop placement ``ScheduleInterleaved1F1B`` expects), so a rank holds stages
``r, r + pp, r + 2 pp, ...``.

Loss scaling. Each micro-batch's loss is its mean cross-entropy times
``share = micro_sequences / global_batch_sequences``; the schedule is built with
``scale_grads=False`` so nothing divides again, and every stage module gets
``set_loss_scale(share)`` so the router losses, which each MoE layer injects into its own graph
in backward (moe/model/moe.py InjectLossGrad), carry the same share without crossing stages.

Shapes are given to ``PipelineStage`` explicitly: without them it infers shapes by running an
extra forward on uninitialised inputs, which pollutes forward-updated statistics
(``MoE.last_stats``) and, on torch 2.13, must agree on ``requires_grad`` with the real run (an
example output without ``requires_grad`` means no gradient is ever received: a hang).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn

from moe.config import Config, ConfigError, ParallelConfig
from moe.model.loss import lm_loss
from moe.parallel.activation_checkpoint import is_recomputing

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# on_moe_forward(layer_name, layer, share): called after every MoE forward on this rank, once per
# micro-batch and layer; layer_name is the global layer key ("3"), as in ``model.layers``, and
# layer the MoE module (its ``last_stats`` are this micro-batch's).
MoECallback = Callable[[str, nn.Module, float], None]


# ---------------------------------------------------------------------------------------------
# Splitting


def n_pipeline_stages(cfg: Config | ParallelConfig, pp_size: int | None = None) -> int:
    """Total number of stages: pp (``pp_size``, default ``parallel.pp``), times the virtual
    stages per rank for interleaved 1F1B."""
    p = cfg.parallel if isinstance(cfg, Config) else cfg
    pp_size = p.pp if pp_size is None else pp_size
    if p.pp_schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={p.pp_schedule!r} must be one of "
                         f"{', '.join(SCHEDULES)}")
    if p.pp_schedule == "interleaved_1f1b" and pp_size > 1:
        return pp_size * p.pp_stages_per_rank
    return pp_size


def split_layers(n_layers: int, n_stages: int,
                 pp_layers: list | None = None) -> list[list[int]]:
    """Global layer indices of each stage, in order.

    ``pp_layers`` lists the layer count per stage (``parallel.pp_layers``). Otherwise the split
    is as even as possible with the remainder on the MIDDLE stages: the first stage also holds
    the embedding and the last the output head, so they are the ones to keep light (10 layers
    on 4 stages: 2, 3, 3, 2; GPT-4's 120 layers on 16 stages: 7 x 4, 8 x 8, 7 x 4). With a
    single extra layer on two stages, the later stage takes it (the first stage stays lightest).
    """
    if n_stages <= 0:
        raise ValueError(f"need at least one pipeline stage, got {n_stages}")
    if pp_layers is not None:
        if len(pp_layers) != n_stages or sum(pp_layers) != n_layers or min(pp_layers) < 1:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)} must list {n_stages} "
                              f"positive stage sizes summing to model.n_layers={n_layers}")
        sizes = list(pp_layers)
    else:
        if n_layers < n_stages:
            raise ConfigError(f"model.n_layers={n_layers} is fewer than the {n_stages} "
                              f"pipeline stages")
        base, extra = divmod(n_layers, n_stages)
        first = -(-(n_stages - extra) // 2)  # ceil: the extra block sits in the middle
        sizes = [base + (1 if first <= s < first + extra else 0) for s in range(n_stages)]
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_indices(pp_rank: int, pp_size: int, n_stages: int) -> list[int]:
    """Stages held by ``pp_rank`` under the loop placement: r, r + pp, r + 2 pp, ..."""
    return list(range(pp_rank, n_stages, pp_size))


def build_stage_models(model: nn.Module, pp_rank: int, pp_size: int,
                       cfg: Config) -> list[tuple[int, nn.Module]]:
    """The stage modules of ``pp_rank``: [(stage_index, module)], by increasing stage index.

    Each is a deep copy of ``model`` (a ``Transformer``) pruned to the layers it owns; modules
    it does not own are never copied (the deepcopy memo maps them to None), so a stage costs
    the memory of its own parameters only. ``model`` itself is left untouched.
    """
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp rank {pp_rank} is outside [0, parallel.pp={pp_size})")
    n_stages = n_pipeline_stages(cfg, pp_size)
    layer_keys = list(model.layers.keys())
    split = split_layers(len(layer_keys), n_stages, cfg.parallel.pp_layers)
    parts = []
    for s in stage_indices(pp_rank, pp_size, n_stages):
        owned = {layer_keys[i] for i in split[s]}
        drop = [m for k, m in model.layers.items() if k not in owned]
        if s != 0:
            drop.append(model.tok_embeddings)
        if s != n_stages - 1:
            drop += [model.norm, model.output]
        memo = {id(m): None for m in drop if m is not None}
        stage = copy.deepcopy(model, memo)
        for k in [k for k, m in stage.layers.items() if m is None]:
            del stage.layers[k]
        assert list(stage.layers.keys()) == [layer_keys[i] for i in split[s]]
        parts.append((s, stage))
    return parts


# ---------------------------------------------------------------------------------------------
# Schedule


def _schedule_class(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
            "interleaved_1f1b": ScheduleInterleaved1F1B}[name]


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def build_schedule(stage_models: list[tuple[int, nn.Module]], pp_mesh, cfg: Config,
                   micro_batch_shape: tuple[int, int], n_microbatches: int,
                   loss_fn: Callable, device: torch.device | str,
                   logits_dtype: torch.dtype | None = None):
    """A ``PipelineStage`` per stage module and the ``parallel.pp_schedule`` schedule over them.

    pp_mesh: a 1-D DeviceMesh (or a ProcessGroup) over the pipeline ranks. micro_batch_shape:
    (sequences, seq_len) of one micro-batch. Example inputs/outputs, on the meta device:
    stage 0 takes token ids [mb, S] int64, later stages hidden states [mb, S, dim]; the last
    stage returns logits [mb, S, vocab], the others hidden states. Floating ones require grad
    (torch 2.13 decides from them whether gradients are exchanged at all). Hidden states keep
    the parameters' dtype (the residual stream stays fp32 under autocast); logits_dtype is the
    head's output dtype, the autocast dtype when the step runs under autocast (torch <= 2.11
    checks every stage output's dtype against these examples).
    """
    from torch.distributed.pipelining import PipelineStage

    group = pp_mesh.get_group() if hasattr(pp_mesh, "get_group") else pp_mesh
    pp_size = torch.distributed.get_world_size(group)
    n_stages = n_pipeline_stages(cfg, pp_size)
    name = cfg.parallel.pp_schedule
    if name == "interleaved_1f1b" and len(stage_models) < 2 and pp_size > 1:
        raise ValueError("interleaved_1f1b needs parallel.pp_stages_per_rank >= 2")
    if name != "interleaved_1f1b" and len(stage_models) != 1:
        raise ValueError(f"parallel.pp_schedule={name} runs one stage per rank, got "
                         f"{len(stage_models)}")
    mb, seq = micro_batch_shape
    dim, vocab = cfg.model.d_model, cfg.model.vocab_size
    device = torch.device(device)
    stages = []
    for index, module in stage_models:
        dtype = _float_dtype(module)
        if index == 0:
            example_in = torch.empty(mb, seq, dtype=torch.long, device="meta")
        else:
            example_in = torch.empty(mb, seq, dim, dtype=dtype, device="meta",
                                     requires_grad=True)
        if index == n_stages - 1:
            example_out = torch.empty(mb, seq, vocab, dtype=logits_dtype or dtype,
                                      device="meta", requires_grad=True)
        else:
            example_out = torch.empty(mb, seq, dim, dtype=dtype, device="meta",
                                      requires_grad=True)
        stages.append(PipelineStage(module, index, n_stages, device, input_args=example_in,
                                    output_args=example_out, group=group))
    cls = _schedule_class(name)
    # scale_grads=False: loss_fn already weighs each micro-batch by its share of the global
    # batch; the default (True) would divide the gradients by n_microbatches once more.
    if "scale_grads" not in inspect.signature(cls.__init__).parameters:  # pragma: no cover
        raise RuntimeError(f"{cls.__name__} of torch {torch.__version__} has no scale_grads "
                           f"argument: pipeline parallelism needs torch >= 2.6")
    stage_arg = stages if name == "interleaved_1f1b" else stages[0]
    return cls(stage_arg, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


# ---------------------------------------------------------------------------------------------
# The pipeline a ShardedModel runs: stages, schedule, one step


class Pipeline:
    """This rank's stage modules, their schedule, and one training step over micro-batches.

    stage_models: from ``build_stage_models`` (after any tensor / expert parallelism).
    micro_batch_shape: (sequences, seq_len) of a micro-batch; the local batch passed to
    ``step`` is ``n_microbatches`` of them. global_batch: sequences in the global batch over
    all data ranks, giving the default ``share = micro_sequences / global_batch`` (``step`` may
    pass its own). autocast: a context-manager factory wrapped around each step (bf16 on GPU).
    on_moe_forward(layer_name, layer, share): called after each MoE forward on this rank, once
    per micro-batch and layer (never again when activation checkpointing recomputes it), with the
    global layer key ("3"), the MoE module (its fresh ``last_stats``; ``router_loss()``) and
    the micro-batch's share; replaceable through the attribute of the same name (None: off).
    """

    def __init__(self, stage_models: list[tuple[int, nn.Module]], pp_mesh, cfg: Config,
                 micro_batch_shape: tuple[int, int], n_microbatches: int,
                 device: torch.device | str, *, global_batch: int | None = None,
                 on_moe_forward: MoECallback | None = None, autocast=None):
        mb = micro_batch_shape[0]
        if global_batch is not None and global_batch < mb * n_microbatches:
            raise ValueError(f"global batch of {global_batch} sequences is smaller than the "
                             f"local batch of {n_microbatches} x {mb}")
        self.stage_models = list(stage_models)
        self.parts = [m for _, m in self.stage_models]
        self.stage_ids = [s for s, _ in self.stage_models]
        self.micro_batch_shape = tuple(micro_batch_shape)
        self.n_microbatches = n_microbatches
        self.device = torch.device(device)
        self.share = None if global_batch is None else mb / global_batch
        self.on_moe_forward = on_moe_forward
        self.autocast = autocast or contextlib.nullcontext
        self.group = pp_mesh.get_group() if hasattr(pp_mesh, "get_group") else pp_mesh
        self.pp_size = torch.distributed.get_world_size(self.group)
        self.pp_rank = torch.distributed.get_rank(self.group)
        self.n_stages = n_pipeline_stages(cfg, self.pp_size)
        self.hidden_dtype = _float_dtype(self.parts[0])
        self.is_first = 0 in self.stage_ids
        self.is_last = (self.n_stages - 1) in self.stage_ids
        with self.autocast():  # the head's output dtype under the step's autocast, if any
            dt = self.device.type
            logits_dtype = (torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt)
                            else None)
        self.schedule = build_schedule(self.stage_models, self.group, cfg, micro_batch_shape,
                                       n_microbatches, self._loss, self.device,
                                       logits_dtype=logits_dtype)
        self._step_kwargs = {}
        if "return_outputs" in inspect.signature(self.schedule.step).parameters:
            self._step_kwargs["return_outputs"] = False  # the logits are not needed
        self._hooks = []
        for part in self.parts:
            for key, layer in part.layers.items():
                ff = layer.feed_forward
                if hasattr(ff, "router"):  # MoE, not a dense FeedForward
                    self._hooks.append(ff.register_forward_hook(self._moe_hook(key)))

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets) * self.share

    def _moe_hook(self, name: str):
        def hook(module, args, output):
            # Activation checkpointing re-runs the forward in backward: count it once.
            if self.on_moe_forward is not None and not is_recomputing():
                self.on_moe_forward(name, module, self.share)
        return hook

    def step(self, x_local: torch.Tensor | None, y_local: torch.Tensor | None,
             share: float | None = None) -> torch.Tensor | None:
        """Forward and backward over the local batch; gradients accumulate into ``.grad``.

        x_local / y_local: [n_microbatches * mb, S] token ids / targets (only the first stage
        reads x, only the last reads y; others may pass None). share: each micro-batch's share
        of the global batch (default: from ``global_batch``). Returns, on the rank holding the
        last stage, the detached sum over micro-batches of CE-mean * share; None elsewhere.
        The caller zeroes gradients before and runs the optimizer after.
        """
        if share is not None:
            self.share = share
        if self.share is None:
            raise ValueError("Pipeline.step needs share= (or global_batch= at build)")
        expected = (self.n_microbatches * self.micro_batch_shape[0], self.micro_batch_shape[1])
        for name, t, needed in (("x", x_local, self.is_first), ("y", y_local, self.is_last)):
            if needed and (t is None or tuple(t.shape) != expected):
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"pipeline step expects {name} of shape {expected} "
                                 f"({self.n_microbatches} micro-batches), got {got}")
        for part in self.parts:
            part.set_loss_scale(self.share)
        args = (x_local,) if self.is_first else ()
        target = y_local if self.is_last else None
        losses: list | None = [] if self.is_last else None
        with self.autocast():
            self.schedule.step(*args, target=target, losses=losses, **self._step_kwargs)
        if not self.is_last:
            return None
        return torch.stack([loss.detach().float() for loss in losses]).sum()


@torch.no_grad()
def pipeline_forward(pipe: Pipeline, x: torch.Tensor) -> torch.Tensor | None:
    """Forward only, for evaluation or generation: logits [B, S, vocab] on the rank holding the
    last stage, None elsewhere. Every pp rank calls it with the same x (any batch size).

    Plain blocking send/recv of each stage's hidden states [B, S, dim] to the next stage's rank,
    stage after stage: no micro-batching and no schedule, so the batch shape is free (the
    schedule's shapes are fixed at build time) and the schedule's state is not touched.
    Modules run in whatever mode they are in (``eval()`` for the eval capacity factor).
    """
    import torch.distributed as dist

    parts = dict(pipe.stage_models)
    b, s = x.shape
    dim = pipe.parts[0].cfg.d_model
    h = None
    with pipe.autocast():
        for stage in range(pipe.n_stages):
            owner = stage % pipe.pp_size
            if owner != pipe.pp_rank:
                continue
            if stage == 0:
                h = x.to(pipe.device)
            elif (stage - 1) % pipe.pp_size != pipe.pp_rank:
                h = torch.empty(b, s, dim, dtype=pipe.hidden_dtype, device=pipe.device)
                src = dist.get_global_rank(pipe.group, (stage - 1) % pipe.pp_size)
                dist.recv(h, src=src, group=pipe.group)
            h = parts[stage](h)
            if stage < pipe.n_stages - 1 and (stage + 1) % pipe.pp_size != pipe.pp_rank:
                dst = dist.get_global_rank(pipe.group, (stage + 1) % pipe.pp_size)
                dist.send(h.to(pipe.hidden_dtype).contiguous(), dst=dst, group=pipe.group)
    return h if pipe.is_last else None
