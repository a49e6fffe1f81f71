"""Training-step throughput and model-FLOPs utilisation (MFU); the engine of scripts/bench.py.

A step is what the trainer (moe/train/loop.py) does for one global batch: forward, cross-entropy,
backward (the MoE layers inject their router-loss gradients themselves) for each of the
``batch_size / micro_batch_size`` micro-batches, gradient clipping when train.grad_clip > 0,
the trainer's AdamW step (``moe.optim.build_optimizer``), zero_grad. Tokens are synthetic
(uniform random ids, seeded), so routing is whatever the freshly initialised router makes of
them (real routing through the real router, not a synthetic balanced assignment). The AdamW
step runs with lr 0: it does all its work but moves no weight, so every timed step routes like
the first. (Trained on the bench's four random batches, the routers collapse within ~20 steps:
on configs/bench.yaml 73% of assignments were dropped at capacity factor 1.25, and the MoE
"won" by skipping its experts.) The drop fraction is reported beside the MFU.

FLOP convention: the project's (``moe.accounting.params``), times 3 for training (forward 1x,
backward 2x). Per trained token:

    6 * N_active  +  3 * 2 * 2 * n_layers * n_heads * head_dim * (seq_len + 1) / 2

``N_active`` = ``ParamCounts.active_matmul_params``: the weights a token's forward multiplies by
-- attention, dense FFNs, router gates, ``top_k / n_experts`` of the experts, and the output head
(a matmul, counted even when tied); not the input-embedding lookup, not the norms. Assignments
dropped past capacity still count (nominal FLOPs, as in any MFU). The attention term is the
q.k^T and probs @ v matmuls at the mean causal context (seq_len + 1) / 2 (what a causal kernel
has to do; PaLM's 12 L H D S counts the full square, about 2x this term). MFU = achieved FLOP/s
over a matmul peak measured in the same run (best of 5 n^3 matmuls in the step's dtype, n = 2048
on CPU, 8192 on CUDA): how close the step comes to this machine's own matmul speed, not to a
datasheet figure.
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from moe.accounting import params as accounting
from moe.accounting.params import ParamCounts
from moe.config import Config, ModelConfig
from moe.device import autocast_dtype, resolve_device, set_threads
from moe.device.malloc import keep_freed_memory
from moe.model import build_model, lm_loss
from moe.model.experts import resolve_impl
from moe.optim import build_optimizer
from moe.parallel.activation_checkpoint import apply_activation_checkpointing
from moe.parallel.grads import clip_gradients

IMPLS = ("grouped", "bmm", "loop")


# ---------------------------------------------------------------------------------------------
# Threads, seeds, sync (device and dtype: moe/device/placement.py, as in the trainer)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Counting


def dense_equivalent(m: ModelConfig) -> ModelConfig:
    """Same model with every feed-forward dense, hidden = top_k * expert_hidden: the same ACTIVE
    parameters as the MoE (less the router gates). Layer i is MoE when (i+1) % moe_every == 0,
    so moe_every = n_layers + 1 makes none of them MoE."""
    d = copy.deepcopy(m)
    d.moe_every = m.n_layers + 1
    d.ffn_hidden = m.top_k * m.expert_hidden + m.shared_hidden_total  # shared experts: always on
    d.validate()
    return d


def train_flops_per_token(m: ModelConfig, counts: ParamCounts, seq_len: int) -> float:
    """3 x moe.accounting.params's forward FLOPs per token (backward costs twice the forward)."""
    return 3.0 * accounting.flops_per_token(m, counts, seq_len)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None,
                repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul in ``dtype`` (after one warm-up);
    n = 2048 on CPU, 8192 on CUDA (a 2048^3 GEMM is too short to fill a large GPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# ---------------------------------------------------------------------------------------------
# One training step


class Stepper:
    """A model, its AdamW and a fixed set of synthetic batches; ``step()`` runs one global step."""

    def __init__(self, cfg: Config, mcfg: ModelConfig, device: torch.device,
                 amp: torch.dtype | None, n_batches: int = 4):
        seed_everything(cfg.train.seed)
        t = cfg.train
        self.device, self.amp = device, amp
        self.model = build_model(mcfg, device)
        self.model.train()
        apply_activation_checkpointing(self.model, t.activation_checkpointing)  # as the trainer
        self.opt = build_optimizer(self.model, t)  # the trainer's AdamW and param groups
        for group in self.opt.param_groups:  # full AdamW work, weights (and routing) fixed
            group["lr"] = 0.0
        self.grad_clip = t.grad_clip
        self.n_micro = t.batch_size // t.micro_batch_size
        self.model.set_loss_scale(1.0 / self.n_micro)
        g = torch.Generator(device="cpu").manual_seed(t.seed + 1)
        shape = (t.micro_batch_size, cfg.data.seq_len + 1)
        self.batches = [torch.randint(0, mcfg.vocab_size, shape, generator=g).to(device)
                        for _ in range(max(n_batches, self.n_micro))]
        self.i = 0
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        counts = accounting.count_model_params(self.model)
        self.n_active = counts.active_matmul_params
        self.flops_per_step = train_flops_per_token(mcfg, counts, cfg.data.seq_len) \
            * self.tokens_per_step
        self.last_loss = float("nan")

    def set_impl(self, impl: str) -> None:
        for m in self.model.moe_layers():
            m.experts.impl = impl

    def forward_backward(self) -> None:
        """Forward, cross-entropy and backward of each micro-batch; gradients accumulate."""
        for _ in range(self.n_micro):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                enabled=self.amp is not None):
                logits = self.model(x)
                loss = lm_loss(logits, y)
            (loss / self.n_micro).backward()
        self.last_loss = loss.detach()

    def timed_forward_backward(self) -> float:
        """Wall seconds of one ``forward_backward`` (the device synced on both sides); the
        gradients are then cleared."""
        sync(self.device)
        t0 = time.perf_counter()
        self.forward_backward()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.model.zero_grad(set_to_none=True)
        return dt

    def step(self) -> dict[str, float]:
        """One global step; returns its phases' wall times (s): fwd_bwd, clip, optimizer."""
        t0 = time.perf_counter()
        self.forward_backward()
        sync(self.device)
        t1 = time.perf_counter()
        if self.grad_clip > 0:
            clip_gradients([self.model], None, self.grad_clip)  # the trainer's (one process)
        sync(self.device)
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t3 = time.perf_counter()
        return {"fwd_bwd": t1 - t0, "clip": t2 - t1, "optimizer": t3 - t2,
                "drop_frac": self.drop_frac()}

    def drop_frac(self) -> float:
        """Dropped / routed (token, expert) assignments over the MoE layers in the last
        micro-batch (0 for a dense model). Read after the step's timing, outside it."""
        stats = [m.last_stats for m in self.model.moe_layers() if m.last_stats is not None]
        routed = sum(int(st.tokens_per_expert.sum()) for st in stats)
        kept = sum(int(st.kept_per_expert.sum()) for st in stats)
        return 0.0 if routed == 0 else 1.0 - kept / routed

    def timed_step(self) -> dict[str, float]:
        """``step()`` between device syncs; adds ``total`` (s)."""
        sync(self.device)
        t0 = time.perf_counter()
        phases = self.step()
        sync(self.device)
        phases["total"] = time.perf_counter() - t0
        return phases


# ---------------------------------------------------------------------------------------------
# The benchmark


def summarise(phases: list[dict[str, float]], stepper: Stepper, peak: float) -> dict:
    times = [p["total"] for p in phases]
    med = statistics.median(times)
    return {
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": stepper.tokens_per_step / med,
        "mfu": stepper.flops_per_step / med / peak,
        "n_steps": len(times),
        "drop_frac": statistics.fmean(p["drop_frac"] for p in phases),
        # Medians of each phase (they need not add up to the median step exactly).
        "phases_s": {k: statistics.median(p[k] for p in phases)
                     for k in ("fwd_bwd", "clip", "optimizer")},
    }


def run_bench(cfg: Config, steps: int = 20, warmup: int = 3, impls: bool = False,
              log: Callable[[str], None] | None = None) -> dict:
    """Time the MoE step and the active-matched dense step, interleaved step by step.

    ``warmup`` untimed steps per variant first (they absorb first-call costs: allocator growth,
    lazy kernel set-up, first-touch page faults). Then ``steps`` timed steps of each variant,
    taken in turns (MoE, dense, then each expert implementation with ``impls``; the order
    reversed every other turn), so the slow phases of a shared, noisy machine fall on all
    variants alike. Reported per variant: the median step time (tokens/s = tokens per step /
    median). ``ratio_paired`` is the median over turns of dense time / MoE time, the
    estimate least disturbed by load that drifts during the run.
    """
    log = log or (lambda s: None)
    threads = set_threads(cfg.train.threads)
    keep_freed_memory()  # as the trainer does (moe/device/malloc.py)
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype(device, cfg.train.dtype)
    run_dtype = amp or torch.float32
    mcfg = cfg.model
    n_moe = sum(mcfg.is_moe_layer(i) for i in range(mcfg.n_layers))
    if n_moe == 0:
        raise ValueError("the config has no MoE layer (model.moe_every > model.n_layers): "
                         "nothing to compare with the dense model")

    log(f"device {device}, torch {torch.__version__}, threads {threads}, dtype "
        f"{'bf16 autocast' if amp else 'fp32'}")
    t0 = time.perf_counter()
    load0 = _loadavg()
    peak = matmul_peak(device, run_dtype)
    log(f"matmul peak ({str(run_dtype).replace('torch.', '')}, best of 5): "
        f"{peak / 1e9:.1f} GFLOP/s")

    moe_stepper = Stepper(cfg, mcfg, device, amp)
    dense_stepper = Stepper(cfg, dense_equivalent(mcfg), device, amp)
    probe = torch.empty(0, device=device, dtype=run_dtype)
    with torch.autocast(device.type, dtype=run_dtype, enabled=amp is not None):
        auto_impl = resolve_impl(mcfg.expert_impl, probe, mcfg.d_model, mcfg.expert_hidden)
    # name -> (stepper, expert impl to set before its steps; None for the dense model).
    # The --impls variants reuse the MoE model (same weights and batches, another kernel).
    variants: dict[str, tuple[Stepper, str | None]] = {
        "moe": (moe_stepper, mcfg.expert_impl), "dense": (dense_stepper, None)}
    if impls:
        variants.update({impl: (moe_stepper, impl) for impl in IMPLS})

    def run_steps(name: str, n: int) -> list[dict[str, float]]:
        s, impl = variants[name]
        if impl is not None:
            s.set_impl(impl)
        return [s.timed_step() for _ in range(n)]

    first_step = {}
    for name in variants:
        if warmup > 0:
            first_step[name] = run_steps(name, 1)[0]["total"]
            run_steps(name, warmup - 1)
            log(f"warm-up {name}: {warmup} steps, first {first_step[name]:.2f} s")

    times: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name] += run_steps(name, 1)
        if (i + 1) % max(1, steps // 4) == 0 or i + 1 == steps:
            log(f"timed {i + 1}/{steps}: median " + ", ".join(
                f"{n} {statistics.median(t['total'] for t in times[n]) * 1e3:.0f} ms"
                for n in names))
    moe_stepper.set_impl(mcfg.expert_impl)

    res = {name: summarise(times[name], variants[name][0], peak) for name in variants}
    moe, dense = res["moe"], res["dense"]
    out = {
        "moe_tokens_per_s": moe["tokens_per_s"],
        "dense_tokens_per_s": dense["tokens_per_s"],
        "ratio": moe["tokens_per_s"] / dense["tokens_per_s"],
        "ratio_paired": statistics.median(d["total"] / m["total"]
                                          for d, m in zip(times["dense"], times["moe"])),
        "mfu": moe["mfu"],
        "dense_mfu": dense["mfu"],
        # Mean share of (token, expert) assignments dropped past capacity in the timed steps:
        # MFU counts nominal FLOPs, so a dropping MoE does (1 - drop_frac) of its expert FLOPs.
        "moe_drop_frac": moe["drop_frac"],
        "peak_flops": peak,
        "moe_step_s": moe["step_s_median"],
        "dense_step_s": dense["step_s_median"],
        "moe_phases_s": moe["phases_s"],
        "dense_phases_s": dense["phases_s"],
        # fwd + bwd only: the step without the optimizer, whose cost follows TOTAL parameters.
        "ratio_fwd_bwd": dense["phases_s"]["fwd_bwd"] / moe["phases_s"]["fwd_bwd"],
        "moe_step_s_min": moe["step_s_min"],
        "dense_step_s_min": dense["step_s_min"],
        "moe_first_step_s": first_step.get("moe"),
        "dense_first_step_s": first_step.get("dense"),
        "moe_active_params": moe_stepper.n_active,
        "dense_active_params": dense_stepper.n_active,
        "moe_total_params": sum(p.numel() for p in moe_stepper.model.parameters()),
        "moe_flops_per_step": moe_stepper.flops_per_step,
        "dense_flops_per_step": dense_stepper.flops_per_step,
        "tokens_per_step": moe_stepper.tokens_per_step,
        "expert_impl": mcfg.expert_impl,
        "expert_impl_resolved": auto_impl,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_name()),
        "torch": torch.__version__,
        "threads": threads,
        "dtype": "bf16" if amp else "fp32",
        "steps": steps,
        "warmup": warmup,
        "loadavg_start": load0,
        "loadavg_end": _loadavg(),
        "flop_convention": "3 x moe.accounting.params.flops_per_token: 6*N_active + "
                           "6*n_layers*n_heads*head_dim*(seq_len+1) per token; N_active = "
                           "active_matmul_params (output head and top_k/n_experts of the experts "
                           "in, input embedding and norms out)",
        "wall_s": time.perf_counter() - t0,
    }
    if impls:
        out["impls"] = {impl: {"tokens_per_s": res[impl]["tokens_per_s"], "mfu": res[impl]["mfu"],
                               "step_s": res[impl]["step_s_median"],
                               "phases_s": res[impl]["phases_s"],
                               "ratio_to_dense": res[impl]["tokens_per_s"] / dense["tokens_per_s"]}
                        for impl in IMPLS}
    return out


# ---------------------------------------------------------------------------------------------
# Many small experts: forward + backward at several expert counts


def expert_count_config(m: ModelConfig, n_experts: int, mode: str = "fine",
                        reference: int = 8) -> ModelConfig:
    """The config's model at ``n_experts`` experts.

    ``fine`` (fine-grained, DeepSeekMoE): each expert of the ``reference``-expert model (the
    config's top_k and expert_hidden) split into ``n_experts / reference``: top_k and
    expert_hidden scaled by that factor, so active AND total parameters stay those of the
    reference (configs/bench.yaml: 8 x 512 top-2, 16 x 256 top-4, 64 x 64 top-16, 256 x 16
    top-64). ``same``: only n_experts changes (top_k experts of expert_hidden each: the same
    compute per token, total expert parameters grow with n_experts; Switch's comparison).
    """
    c = copy.deepcopy(m)
    c.n_experts = n_experts
    if mode == "fine":
        if n_experts % reference or (m.expert_hidden * reference) % n_experts:
            raise ValueError(f"fine-grained experts: {n_experts} is not a multiple of "
                             f"{reference} dividing expert_hidden={m.expert_hidden} * {reference}")
        c.top_k = m.top_k * n_experts // reference
        c.expert_hidden = m.expert_hidden * reference // n_experts
    elif mode != "same":
        raise ValueError(f"expert-count mode {mode!r}: use fine or same")
    c.validate()
    return c


def run_expert_counts(cfg: Config, counts: tuple[int, ...] = (8, 16, 64, 256),
                      mode: str = "fine", steps: int = 10, warmup: int = 2,
                      log: Callable[[str], None] | None = None) -> dict:
    """Forward + backward tokens/s of the MoE at each expert count (``expert_count_config``),
    relative to the first count; the variants' steps are taken in turns (order reversed every
    other turn) so the load of a shared machine falls on all alike. Median over ``steps``
    timed fwd+bwd (no optimizer step: its cost follows total parameters, not routing)."""
    log = log or (lambda s: None)
    threads = set_threads(cfg.train.threads)
    keep_freed_memory()  # as the trainer does (moe/device/malloc.py)
    device = resolve_device(cfg.train.device)
    amp = autocast_dtype(device, cfg.train.dtype)
    load0 = _loadavg()
    steppers = {n: Stepper(cfg, expert_count_config(cfg.model, n, mode), device, amp)
                for n in counts}

    for s in steppers.values():
        for _ in range(warmup):
            s.timed_forward_backward()
    experts = {n: ExpertsAlone(steppers[n]) for n in counts}
    times: dict[int, list[float]] = {n: [] for n in counts}
    expert_times: dict[int, list[float]] = {n: [] for n in counts}
    order = list(counts)
    for i in range(steps):
        for n in (order if i % 2 == 0 else order[::-1]):
            times[n].append(steppers[n].timed_forward_backward())
            expert_times[n].append(experts[n].fwd_bwd())
        log(f"turn {i + 1}/{steps}: " + ", ".join(
            f"{n} experts {statistics.median(times[n]) * 1e3:.0f} ms" for n in counts))
    tps = {n: steppers[n].tokens_per_step / statistics.median(times[n]) for n in counts}
    first = counts[0]
    t_first, x_first = statistics.median(times[first]), statistics.median(expert_times[first])
    return {
        "mode": mode, "threads": threads, "device": str(device), "steps": steps,
        "warmup": warmup, "tokens_per_step": steppers[first].tokens_per_step,
        "loadavg_start": load0, "loadavg_end": _loadavg(),
        "counts": {str(n): {
            "n_experts": n, "top_k": steppers[n].model.cfg.top_k,
            "expert_hidden": steppers[n].model.cfg.expert_hidden,
            "fwd_bwd_tokens_per_s": tps[n], "ratio": tps[n] / tps[first],
            "fwd_bwd_s_median": statistics.median(times[n]),
            # The experts' own computation (GroupedExperts forward + backward on the layers'
            # real expert loads; routing, dispatch and combine left out), and the ratio the
            # model would have if only that changed from the first count: how much of the
            # gap is the expert kernels' (fewer kept rows can also make the rest cheaper).
            "experts_fwd_bwd_s_median": statistics.median(expert_times[n]),
            "experts_only_ratio": t_first / (
                t_first - x_first + statistics.median(expert_times[n])),
            "drop_frac": steppers[n].drop_frac(),
            "active_params": steppers[n].n_active,
            "total_params": sum(p.numel() for p in steppers[n].model.parameters())}
            for n in counts},
    }


class ExpertsAlone:
    """The experts of a Stepper's MoE layers run alone: each layer's GroupedExperts forward +
    backward on the expert loads (rows per expert) its last forward routed, with random rows
    and gradients. What the expert kernels cost, apart from routing, dispatch and combine: if
    this alone grows by more than the budget from one expert count to another, no change
    outside the experts reaches it (``run_expert_counts``' ``experts_only_ratio``)."""

    def __init__(self, stepper: Stepper):
        self.calls: list[tuple[nn.Module, torch.Tensor, int, bool]] = []

        def record(module, args, kwargs):
            _, counts, capacity = args[:3]
            self.calls.append((module, counts.detach().clone(), int(capacity),
                               kwargs.get("scale") is not None))

        layers = [m.experts for m in stepper.model.moe_layers() if m.experts is not None]
        hooks = [e.register_forward_pre_hook(record, with_kwargs=True) for e in layers]
        try:
            with torch.no_grad(), torch.autocast(stepper.device.type,
                                                 dtype=stepper.amp or torch.float32,
                                                 enabled=stepper.amp is not None):
                stepper.model(stepper.batches[0][:, :-1])
        finally:
            for h in hooks:
                h.remove()
        self.calls = self.calls[:len(layers)]  # one forward: one call per layer
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = max((int(c.sum()) for _, c, _, _ in self.calls), default=0)
        dim = layers[0].w1.shape[1] if layers else 0
        self.x = torch.randn(rows, dim, generator=g).to(stepper.device)
        self.dy = torch.randn(rows, dim, generator=g).to(stepper.device)
        self.scale = torch.rand(rows, generator=g).to(stepper.device)
        self.stepper = stepper

    def fwd_bwd(self) -> float:
        """Seconds for every layer's experts forward + backward (one call each)."""
        s = self.stepper
        sync(s.device)
        t0 = time.perf_counter()
        for experts, counts, capacity, scaled in self.calls:
            m = int(counts.sum())
            x = self.x[:m].detach().requires_grad_()
            with torch.autocast(s.device.type, dtype=s.amp or torch.float32,
                                enabled=s.amp is not None):
                y = experts(x, counts, capacity, scale=self.scale[:m] if scaled else None)
            y.backward(self.dy[:m].to(y.dtype))
        sync(s.device)
        dt = time.perf_counter() - t0
        s.model.zero_grad(set_to_none=True)
        return dt


def _loadavg() -> float | None:
    """1-minute load average (how busy the machine was: numbers from a shared box vary)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def profile_step_cpu(cfg: Config, steps: int = 20, warmup: int = 5, rows: int = 25) -> dict:
    """Operator table in thread CPU time of ``steps`` MoE training steps after warm-up
    (moe/bench/ops.py: robust to a busy machine, unlike the profiler's wall time)."""
    from moe.bench.ops import op_cpu_table

    set_threads(cfg.train.threads)
    keep_freed_memory()  # as the trainer does (moe/device/malloc.py)
    device = resolve_device(cfg.train.device)
    s = Stepper(cfg, cfg.model, device, autocast_dtype(device, cfg.train.dtype))
    for _ in range(warmup):
        s.step()
    return op_cpu_table(s.step, steps, rows)


def profile_step(cfg: Config, steps: int = 3, warmup: int = 2, rows: int = 25) -> str:
    """torch.profiler table (self time) of ``steps`` MoE training steps after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    s = Stepper(cfg, cfg.model, device, autocast_dtype(device, cfg.train.dtype))
    for _ in range(warmup):
        s.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            s.step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
