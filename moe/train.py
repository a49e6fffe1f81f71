"""The single-process training loop: data, model, AdamW, schedule, eval, checkpoints, logs.

Running again with the same ``train.run_dir`` resumes from its latest checkpoint and continues
exactly as an unbroken run would (model, optimizer, data position and RNG are all restored).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from moe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moe.config import Config, ConfigError
from moe.data import PackedLoader, prepare_data, val_batches
from moe.generate import generate
from moe.metrics import MetricsLogger, RoutingAccumulator
from moe.model import build_model
from moe.optim import batch_size_at, build_optimizer, lr_at, micro_batches


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available: use auto or cpu")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on GPU (auto or bf16); fp32 on CPU unless bf16 is asked for."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, batches, device, cfg: Config) -> float:
    """Mean LM loss over fixed validation batches, in eval mode (eval capacity factor)."""
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast_context(device, cfg.train.dtype):
            logits = model(x.to(device))
        total += float(lm_loss(logits, y.to(device)))
    model.train()
    return total / len(batches)


def _check_resume_config(saved: dict, cfg: Config, path: Path) -> None:
    """A checkpoint can only continue the same model and data: name what differs."""
    now = cfg.to_dict()
    diffs = [f"{sec}.{k}" for sec in ("model", "data") for k in now[sec]
             if saved.get(sec, {}).get(k) != now[sec][k]]
    if diffs:
        raise ConfigError(f"{path} was trained with different {', '.join(diffs)}: use a new "
                          f"train.run_dir or the saved values (see config.yaml in the run folder)")


def train(cfg: Config) -> dict:
    """Train per ``cfg``; returns a summary dict (final step, losses, sample text)."""
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.ep != 1:
        raise ConfigError("parallel.tp/pp/dp/ep > 1 need the distributed trainer, which is not "
                          "available yet: set them to 1")
    tc, mc = cfg.train, cfg.model
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    try:
        data = prepare_data(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad data settings: one line, no traceback
        raise ConfigError(f"data: {e}") from e
    seq_len = cfg.data.seq_len
    torch.manual_seed(tc.seed)
    model = build_model(mc, device)
    optimizer = build_optimizer(model, tc)
    loader = PackedLoader(data.train, data.epochs, seq_len, tc.seed)
    val = val_batches(data.val, seq_len, tc.micro_batch_size, tc.eval_batches)

    step, tokens = 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, map_location=device)
        _check_resume_config(state["config"], cfg, ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        step, tokens = state["step"], state["tokens"]
        print(f"resuming from {ckpt} at step {step}", file=sys.stderr)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    logger = MetricsLogger(run_dir, cfg, resume_step=step)
    fwd = torch.compile(model) if tc.compile else model
    moe_layers = {name: layer.feed_forward for name, layer in model.layers.items()
                  if hasattr(layer.feed_forward, "router")}
    progress = _progress_bar(cfg, step)
    summary: dict = {"val_loss": None}

    def save() -> None:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(run_dir, step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "loader": loader.state_dict(), "rng": rng, "step": step, "tokens": tokens,
            "config": cfg.to_dict()}, keep=tc.keep_checkpoints)

    model.train()
    while step < tc.max_steps:
        t0 = time.perf_counter()
        batch = batch_size_at(tokens, tc, seq_len, mc.capacity_group_seqs)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        routing = RoutingAccumulator(moe_layers)
        step_lm = 0.0
        for mb in micro_batches(batch, tc.micro_batch_size):
            share = mb / batch  # token-weighted: the step's gradient is the global batch's
            x, y = loader.next_batch(mb)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            model.set_loss_scale(share)
            with autocast_context(device, tc.dtype):
                logits = fwd(x)
            loss = lm_loss(logits, y)
            (loss * share).backward()  # router losses inject their own gradient (moe.py)
            step_lm += share * float(loss.detach())
            routing.add(share)
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                       if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch * seq_len
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        scalars, per_layer = routing.summary()
        row = {"step": step, "tokens": tokens, "loss": step_lm + scalars["router_loss"],
               "lm_loss": step_lm, **scalars, "lr": lr, "grad_norm": float(grad_norm),
               "batch_size": batch, "tokens_per_s": batch * seq_len / dt}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss is {row['loss']} at step {step}: lower train.lr or "
                                     f"check the data; last checkpoint is kept")
        if step % cfg.log.log_every == 0 or step in (1, tc.max_steps):
            logger.log({**row, "layers": per_layer})
        if step % tc.eval_every == 0 or step == tc.max_steps:
            summary["val_loss"] = evaluate(fwd, val, device, cfg)
            logger.log({"step": step, "tokens": tokens, "val_loss": summary["val_loss"]})
        if step % tc.ckpt_every == 0 or step == tc.max_steps:
            save()
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             drop=f"{row['drop_frac']:.3f}",
                             val="-" if summary["val_loss"] is None else f"{summary['val_loss']:.3f}")
    progress.close()
    logger.close()

    summary.update(step=step, tokens=tokens)
    if tc.sample_tokens:
        summary["sample"] = sample(model, data.tokenizer, cfg, device)
    return summary


def sample(model, tokenizer, cfg: Config, device: torch.device) -> str:
    tc = cfg.train
    ids = tokenizer.encode(tc.sample_prompt)
    prompt = torch.tensor([ids or [tokenizer.eot_id]], device=device)
    gen = torch.Generator().manual_seed(tc.seed)
    with autocast_context(device, tc.dtype):
        out = generate(model, prompt, tc.sample_tokens, cfg.model.max_seq_len,
                       tc.sample_temperature, tc.sample_top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())


def _progress_bar(cfg: Config, step: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=step, disable=not cfg.log.progress,
                desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
