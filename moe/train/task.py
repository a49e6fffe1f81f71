"""What a run trains on: the data, the model it builds, a step's loss and the evaluation.

The training loop (moe/train/loop.py) is one loop for every kind of run; what differs lives in a
task object:

    TextTask     the language model: cached token streams, packed windows, next-token loss
    VisionTask   moe/vision/task.py: generated images and captions, the Flamingo-style model

A task has ``tokenizer``, ``seq_len``, ``build_model(device)``, ``loader()`` (with
``state_dict`` / ``load_state_dict``), ``step(runtime, loader, batch, routing)`` (forward and
backward of one global batch, returning this rank's share of its loss), ``evaluate(runtime)``
(a dict holding at least ``val_loss``, the same on every rank), ``prepare(runtime)`` (after
parallelize, before the optimizer), ``trains_text`` and ``init_keep`` (parameters a
``train.init_from`` checkpoint may lack), ``start(runtime, init_source)`` (once, before step 1
of a new run; returns a dict to log at step 0, or None), and ``sample(runtime, device)``.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from moe.config import Config, ConfigError
from moe.data import PackedLoader, load_data, val_batches
from moe.device import autocast_context
from moe.inference.generate import generate
from moe.model import build_model
from moe.model.router import check_causal
from moe.train.metrics import RoutingAccumulator


def make_task(cfg: Config):
    """The task ``cfg`` describes (a ConfigError for bad data settings, before anything is
    written)."""
    if cfg.vision.enabled:
        from moe.vision.task import VisionTask

        return VisionTask(cfg)
    return TextTask(cfg)


class TextTask:
    trains_text = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.seq_len = cfg.data.seq_len
        self.data = load_data(cfg)
        self.tokenizer = self.data.tokenizer
        tc = cfg.train
        try:
            self.val = val_batches(self.data.val, self.seq_len, tc.micro_batch_size,
                                   cfg.data.val_windows)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from e

    @staticmethod
    def init_keep(name: str) -> bool:
        return False

    def build_model(self, device: str | torch.device = "meta") -> nn.Module:
        return build_model(self.cfg.model, device)

    def prepare(self, runtime) -> None:
        pass

    def start(self, runtime, init_source) -> dict | None:
        return None

    def loader(self) -> PackedLoader:
        return PackedLoader(self.data.train, self.data.epochs, self.seq_len, self.cfg.train.seed)

    def step(self, runtime, loader: PackedLoader, batch: int,
             routing: RoutingAccumulator) -> float:
        x, y = loader.next_batch(batch)  # the global batch, identical on every rank
        return runtime.forward_backward(x, y, routing)

    def evaluate(self, runtime) -> dict[str, float]:
        out = {"val_loss": runtime.evaluate(self.val)}
        if math.isfinite(runtime.last_eval_se):  # two or more validation batches
            out["val_loss_se"] = runtime.last_eval_se
        return out

    def sample(self, runtime, device: torch.device) -> str | None:
        cfg = self.cfg
        try:
            check_causal(runtime.parts[0], "a sample")
        except ValueError as e:
            if runtime.is_main:
                print(f"(no sample: {e})", file=sys.stderr)
            return None
        if runtime.pipeline is not None:
            if runtime.is_main:
                print("(no sample under pipeline parallelism: run scripts/generate.py --run "
                      f"{cfg.train.run_dir} in one process)", file=sys.stderr)
            return None
        return sample_text(runtime.parts[0], self.tokenizer, cfg, device)


def sample_text(model: nn.Module, tokenizer, cfg: Config, device: torch.device) -> str:
    """Sample from the model; under tp/ep every rank runs it (same seed, same tokens)."""
    tc = cfg.train
    ids = tokenizer.encode(tc.sample_prompt)
    prompt = torch.tensor([ids or [tokenizer.eot_id]], device=device)
    gen = torch.Generator().manual_seed(tc.seed)
    with autocast_context(device, tc.dtype):
        out = generate(model, prompt, max_new_tokens=tc.sample_tokens,
                       temperature=tc.sample_temperature, top_k=tc.sample_top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())
