"""Pre-training the text model as a language model before a vision run trains
(``vision.text_pretrain_steps``): Flamingo joins its vision side to a pretrained language
model.

Measured on configs/vision_tiny.yaml (docs/vision.md, "Binding in the run"). With binding
questions in the last steps (``vision.binding_share``), a text side that learnt only the
shapes texts stays at chance on "is there a red circle?" (0.50). A text side that first read
the builtin corpus (200 or 400 steps) reached 0.69-0.80 in three of eight runs, and ended
near chance in the rest. Our reading, not measured: the corpus teaches what the shapes texts
do not, a word spread over several BPE tokens read as one, and a token compared with an
earlier one. Checking the colour read at the shape's place against the colour asked needs
both.

The recipe is ``configs/tiny.yaml``'s text run, in the vision run's ``start``: windows of
``model.max_seq_len`` tokens of the ``data.*`` corpus (the vision run's own tokenizer and
token cache), as many tokens a step as a training step, AdamW with the trainer's settings at
``vision.text_pretrain_lr`` (warm-up over ``min(train.warmup_steps, steps // 5)`` steps,
then cosine), in this run's layout (data / expert parallel: ``forward_backward`` and
``reduce_and_clip``, as a training step). The optimizer is thrown away after: the vision
steps start with a fresh one and their own schedule, as a run started from a text run's
checkpoint (``train.init_from``) would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe.config import Config, ConfigError
from moe.data import PackedLoader
from moe.optim import build_optimizer, lr_at
from moe.parallel.sharded_model import moe_layer_names
from moe.train.metrics import RoutingAccumulator


def text_pretrain_batch(cfg: Config) -> int:
    """Windows a step: ``train.batch_size * data.seq_len`` tokens in ``model.max_seq_len``
    windows."""
    return cfg.train.batch_size * cfg.data.seq_len // cfg.model.max_seq_len


def check_text_pretrain(cfg: Config) -> None:
    """ConfigError (one line) for pre-training a frozen text model, or for a step's windows
    that are not a whole multiple of the data ranks (each rank takes an equal share)."""
    vc = cfg.vision
    if not vc.text_pretrain_steps:
        return
    if vc.freeze_text:
        raise ConfigError(f"vision.text_pretrain_steps={vc.text_pretrain_steps} trains the "
                          "text model, which vision.freeze_text=true freezes: set one off")
    shards = cfg.parallel.dp * cfg.parallel.ep
    tokens = cfg.train.batch_size * cfg.data.seq_len
    windows = text_pretrain_batch(cfg)
    if windows < 1 or windows * cfg.model.max_seq_len != tokens or windows % shards:
        raise ConfigError(f"vision.text_pretrain_steps: train.batch_size * data.seq_len / "
                          f"model.max_seq_len = {tokens / cfg.model.max_seq_len:g} windows a "
                          f"step, not a multiple of the {shards} data ranks: change "
                          "train.batch_size")


def pretrain_text(runtime, cfg: Config, text) -> float:
    """``vision.text_pretrain_steps`` language-model steps of the text model on ``text``
    (``load_data(cfg)``); returns the mean loss of the last 10% of steps."""
    vc, tc = cfg.vision, cfg.train
    steps = vc.text_pretrain_steps
    schedule = dataclasses.replace(tc, lr=vc.text_pretrain_lr, max_steps=steps,
                                   decay_steps=None,
                                   warmup_steps=min(tc.warmup_steps, max(1, steps // 5)))
    optimizer = build_optimizer(runtime.parts, schedule, runtime.mesh, cfg.parallel.dp_shard)
    loader = PackedLoader(text.train, text.epochs, cfg.model.max_seq_len, tc.seed)
    names, batch = moe_layer_names(cfg), text_pretrain_batch(cfg)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        routing = RoutingAccumulator(names, cfg.model.n_experts)
        x, y = loader.next_batch(batch)  # the global batch, identical on every rank
        loss = runtime.forward_backward(x, y, routing)
        runtime.reduce_and_clip(tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(runtime.reduce_step_metrics(loss, routing))
    tail = losses[-max(1, steps // 10):]
    return float(np.mean(tail))
