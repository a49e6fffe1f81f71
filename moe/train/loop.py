"""The training loop: data, model, AdamW, schedule, eval, checkpoints, logs.

The same loop runs in one process and under ``torchrun`` with any tp x pp x dp x ep layout; what
differs per layout lives in ``moe.parallel.sharded_model.ShardedModel``. Every rank builds the
model's shapes on the meta device and reads the same global batch; the ShardedModel materialises
this rank's part of the model (the values a single process would draw from train.seed) and of
the batch. Running again with the same ``train.run_dir`` resumes from its latest checkpoint and
continues exactly as an unbroken run would (model, optimizer, data position, RNG), also on
another layout.

``train.init_from`` starts a new run from another run's weights (fresh optimizer, schedule and
data position; only model.max_seq_len, model.rope_scaling, data.seq_len and train.* may
change: moe/train/init_from.py). A checkpoint in ``train.run_dir`` wins over it: the run resumes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from moe.checkpoint import (
    WEIGHTS_ONLY,
    latest_good_checkpoint,
    list_checkpoints,
    read_extra,
    restore_checkpoint,
    save_checkpoint,
)
from moe.config import Config, ConfigError, saved_differences
from moe.device import autocast_context, resolve_device, set_threads
from moe.device.malloc import keep_freed_memory
from moe.model.balance import update_expert_biases
from moe.optim import apply_hyperparameters, batch_size_at, build_optimizer, lr_at
from moe.parallel.launch import init_distributed
from moe.parallel.rng import restore_rng_state, rng_state
from moe.parallel.sharded_model import ShardedModel, moe_layer_names
from moe.train import run_lock
from moe.train.init_from import load_init_weights, resolve_init_from
from moe.train.metrics import MetricsLogger, RoutingAccumulator
from moe.train.nonfinite import NonFiniteGuard
from moe.train.task import make_task

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["train"]


# What a resume must keep: the model, the data (the validation set included), the vision
# settings, and the seed, which draws the data order the loader continues.
FIXED_ON_RESUME = ["model", "data", "vision", "train.seed"]


def _check_resume_config(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    """A checkpoint can only continue the same model, data and data order: name what
    differs."""
    diffs = [key for key, _, _ in saved_differences(saved, cfg, FIXED_ON_RESUME)]
    if diffs:
        raise ConfigError(f"{path} was trained with different {', '.join(diffs)}: use a new "
                          f"train.run_dir or the saved values (see config.yaml in the run folder)")


def _weights_only(ckpt: Path) -> bool:
    """Was ``ckpt`` written by moe-import-hf or moe-upcycle? (A checkpoint whose extra does
    not read is left to ``latest_good_checkpoint``, which warns and skips it.)"""
    try:
        extra = read_extra(ckpt)
    except Exception:  # noqa: BLE001 - any unreadable extra: not this check's to report
        return False
    return any(k in extra for k in WEIGHTS_ONLY)


def train(cfg: Config) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary dict (final step, losses, sample text)."""
    # The run-folder lock, the metrics logger (and wandb) and the progress bar: released in
    # reverse order however _train ends, a raised error or Ctrl-C included.
    with contextlib.ExitStack() as cleanup:
        return _train(cfg, cleanup)


def _close_logger(logger: MetricsLogger) -> Callable[..., None]:
    """An ``ExitStack.push`` callback that closes ``logger``; a run ended by an exception is
    marked failed in wandb (``finish(exit_code=1)``) rather than finished."""
    def close(exc_type: type[BaseException] | None, exc: BaseException | None, tb) -> None:
        try:
            if exc_type is not None and logger.wandb is not None:
                run, logger.wandb = logger.wandb, None  # close() must not finish it again
                run.finish(exit_code=1)
        finally:
            logger.close()

    return close


def _train(cfg: Config, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    tc, mc = cfg.train, cfg.model
    dims, dist_device = init_distributed(cfg)
    mesh = dims.mesh()  # None in one process
    if mesh is None and dims.world_size != 1:
        raise ConfigError(f"{dims.describe()} needs {dims.world_size} processes: launch with "
                          f"torchrun --nproc_per_node={dims.world_size} scripts/train.py ...")
    device = dist_device or resolve_device(tc.device)
    if device.type == "cpu":
        keep_freed_memory()  # no page fault per 4 KiB of a large temporary (moe/device/malloc.py)
    set_threads(tc.threads)
    run_dir = Path(tc.run_dir)
    # Nothing is written to the run folder before data, model and layout are known to be good
    # (a bad setting leaves no folder behind); a busy folder is refused before data is built.
    rank0 = mesh is None or torch.distributed.get_rank() == 0
    if rank0:
        run_lock.check_free(run_dir)
        for line in cfg.notices():
            print(f"note: {line}", file=sys.stderr)
    # train.init_from is checked before anything is built (a refused change costs nothing),
    # and only for a run folder with no checkpoint yet: otherwise the run resumes.
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and _weights_only(checkpoints[-1]):
        # An import or upcycle: weights only, no optimizer, loader or RNG state to resume.
        raise ConfigError(f"train.run_dir={run_dir} holds an imported or upcycled model, "
                          f"which has no training state to resume: train a new run from it "
                          f"with train.init_from={run_dir} and another train.run_dir")
    init_source = resolve_init_from(cfg, mesh) if tc.init_from and not checkpoints else None

    # The data, the model and a step's loss: the language model, or the vision model
    # (vision.enabled). Bad data settings are one line, no traceback (moe/train/task.py).
    task = make_task(cfg)
    seq_len = task.seq_len
    torch.manual_seed(tc.seed)  # the global RNG: router jitter
    # Shapes only (meta device): the runtime materialises this rank's part, drawn from
    # train.seed by parameter name, so every layout and device starts from the same weights.
    runtime = ShardedModel(cfg, task.build_model("meta"), dims, device,
                      autocast=lambda: autocast_context(device, tc.dtype))
    main = runtime.is_main
    task.prepare(runtime)  # e.g. vision.freeze_text: before the optimizer sees the parameters
    optimizer = build_optimizer(runtime.parts, tc, mesh, cfg.parallel.dp_shard)
    loader = task.loader()

    if rank0:  # from here the folder is ours until train() returns (moe/train/run_lock.py)
        cleanup.enter_context(run_lock.hold(run_dir))
    step, tokens = 0, 0
    ckpt = latest_good_checkpoint(run_dir, mesh)  # newest that verifies; warns of broken ones
    if ckpt is not None:
        _check_resume_config(read_extra(ckpt)["config"], cfg, ckpt)
        extra = restore_checkpoint(ckpt, runtime.parts, optimizer, mesh)
        loader.load_state_dict(extra["loader"])
        restore_rng_state(extra["rng"], dims, device)  # per rank (moe/parallel/rng.py)
        step, tokens = extra["step"], extra["tokens"]
        # The checkpoint restored its AdamW settings; the config's win, and changes are said.
        changed = apply_hyperparameters(optimizer, tc)
        if main:
            print(f"resuming from {ckpt} at step {step}", file=sys.stderr)
            if changed:
                print("resume: optimizer settings changed since the checkpoint, applying "
                      + "; ".join(changed), file=sys.stderr)
    elif init_source is not None:  # a new run from those weights, at step 0
        load_init_weights(init_source, runtime.parts, mesh, main, keep=task.init_keep)
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # The run folder carries its tokenizer: export and generation need no data cache.
        task.tokenizer.save(run_dir / "tokenizer.json")
    logger = MetricsLogger(run_dir, cfg, resume_step=step) if main else None
    if logger is not None:  # metrics.jsonl closed and wandb finished however the run ends
        cleanup.push(_close_logger(logger))
    if ckpt is None:  # a new run (e.g. the vision encoder's pre-training, moe/vision/pretrain.py)
        started = task.start(runtime, init_source)
        if started and main:
            logger.log({"step": 0, "tokens": 0, **started})
    if tc.compile:
        runtime.compile()
    progress = _progress_bar(cfg, step, enabled=main)
    cleanup.callback(progress.close)
    summary: dict[str, Any] = {"val_loss": None}
    # train.on_nonfinite (moe/train/nonfinite.py); its counts are checkpointed.
    guard = NonFiniteGuard(tc, extra.get("nonfinite") if ckpt is not None else None)

    def save() -> None:
        rng = rng_state(dims, device)  # every rank's generators (collective)
        extra = {"loader": loader.state_dict(), "rng": rng, "step": step, "tokens": tokens,
                 "config": cfg.to_dict(), "nonfinite": guard.state_dict()}
        save_checkpoint(run_dir, step, runtime.parts, optimizer, extra, mesh,
                        keep=tc.keep_checkpoints)

    def on_nonfinite(loss: float, norm: float) -> None:
        """Step step+1 failed, its gradients dropped: skip it, roll back, or stop."""
        nonlocal step, tokens
        msg, last = guard.event(step + 1, step, loss, norm,
                                lambda: latest_good_checkpoint(run_dir, mesh),
                                logger.log if main else lambda row: None)
        if tc.on_nonfinite == "rollback":
            # The resume path, but the loader keeps its position: the batches read since the
            # checkpoint, the offending one included, are not replayed.
            saved = restore_checkpoint(last, runtime.parts, optimizer, mesh)
            restore_rng_state(saved["rng"], dims, device)
            step, tokens = saved["step"], saved["tokens"]
            apply_hyperparameters(optimizer, tc)  # as on resume: the config's settings win
            if main:
                logger.rewind(step)
                progress.reset(total=tc.max_steps)
                progress.update(step)
        if main:
            progress.write(msg, file=sys.stderr)

    runtime.train(True)
    layer_names = moe_layer_names(cfg)
    while step < tc.max_steps:
        t0 = time.perf_counter()
        batch = batch_size_at(tokens, tc, mc.capacity_group_seqs)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        routing = RoutingAccumulator(layer_names, mc.n_experts)
        step_lm = task.step(runtime, loader, batch, routing)  # the global batch, every rank
        grad_norm = float(runtime.reduce_and_clip(tc.grad_clip))
        # Global and identical on every rank (moe/train/nonfinite.py): the same decision on all.
        step_lm = runtime.reduce_step_metrics(step_lm, routing)
        scalars, per_layer = routing.summary()
        if guard.is_bad(step_lm + scalars["router_loss"], grad_norm):
            optimizer.zero_grad(set_to_none=True)
            on_nonfinite(step_lm + scalars["router_loss"], grad_norm)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # DeepSeek-V3: b += u * sign(mean - load), global loads (not for a frozen text model)
        if mc.balance == "bias" and task.trains_text:
            update_expert_biases(runtime.moe_layers(), routing.names, routing.tokens)
        step += 1
        tokens += batch * seq_len
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        row = {"step": step, "tokens": tokens, "loss": step_lm + scalars["router_loss"],
               "lm_loss": step_lm, **scalars, "lr": lr, "grad_norm": grad_norm,
               "batch_size": batch, "tokens_per_s": batch * seq_len / dt}
        if main and (step % cfg.log.log_every == 0 or step in (1, tc.max_steps)):
            logger.log({**row, "layers": per_layer})
        if step % tc.eval_every == 0 or step == tc.max_steps:
            evaluation = task.evaluate(runtime)
            summary.update(evaluation)
            if main:
                logger.log({"step": step, "tokens": tokens, **evaluation})
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save()
        progress.update(1)
        val_loss = summary["val_loss"]
        progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             drop=f"{row['drop_frac']:.3f}",
                             val="-" if val_loss is None else f"{val_loss:.3f}")
    progress.close()

    summary.update(step=step, tokens=tokens, is_main=main, nonfinite=guard.state_dict())
    if tc.sample_tokens:
        text = task.sample(runtime, device)
        if text is not None:
            summary["sample"] = text
    return summary


def _progress_bar(cfg: Config, step: int, enabled: bool = True) -> tqdm:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=step,
                disable=not (cfg.log.progress and enabled), desc="train", unit="step",
                dynamic_ncols=True, file=sys.stderr)
