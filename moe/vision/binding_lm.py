"""How many binding questions the vision language model needs: its text side and
cross-attention trained on "is there a <colour> <shape>?" ALONE, over frozen image latents.

Issue 25's question was why ``val_exists_accuracy`` stays at 1/2 in ``configs/vision_tiny.yaml``
while the readout probe (probe.py) answers binding from the same latents at 0.93. This trains
the model's own path (text layers, gated cross-attention) on binding questions only, so the
answer gets all of the gradient, and reports the validation binding accuracy every
``eval_every`` steps: the number of binding questions after which the model escapes the
constant answer (loss ln 2) is its sample cost, to set against what a training run feeds it.

    rows     (image index, [<|endoftext|>, question tokens...], first answer token): a yes
             and a distractor no per image (data.exists_queries), as the model's metric asks
    latents  the run's frozen encoder and resampler, once per image
             (``probe.encoder_features(model, split, "latents")``)
    step     AdamW (weight decay 0.1, betas 0.9 / 0.95), linear warm-up then constant lr,
             gradient clip 1; cross-entropy of the first answer token (" y" of " yes", or
             " no") at the question's last token, over the whole vocabulary
    accuracy yes when its first token's logit beats no's (the model's metric sums each
             candidate's tokens; the first token is where the two differ)

``features="oracle"`` swaps the latents for the readout probe's perfect per-cell features
(one-hot colour, shape, presence, cell, zero-padded to the media width and scaled by
``ORACLE_SCALE``): what the text side needs when the image side is perfect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.data.tokenizer import BPETokenizer
from moe.model.moe import CONFIGURED_CAPACITY
from moe.vision import data as vdata
from moe.vision.pretrain import PRETRAINED_MODULES
from moe.vision.probe import oracle_features

ORACLE_SCALE = 3.0  # the latents are RMS-normed (~1 per channel); one-hot features of 1 are sparser
WARMUP_STEPS = 60


@dataclass(frozen=True)
class BindingRow:
    image: int
    ids: tuple[int, ...]  # <|endoftext|> + the question's tokens, ending at "a:"
    answer: int  # the first token of " yes" or " no"


def binding_rows(tok: BPETokenizer, split: vdata.VisionSplit,
                 n_images: int | None = None) -> list[BindingRow]:
    """A yes and a distractor no per image (``data.exists_queries``), tokenised."""
    return [BindingRow(i, (tok.eot_id, *tok.encode(q.prompt)), tok.encode(q.answer)[0])
            for i, q in vdata.exists_queries(split, n_images)]


def oracle_media(split: vdata.VisionSplit, n_latents: int, width: int) -> torch.Tensor:
    """The probe's perfect per-cell features as media: [N, n_latents, width]."""
    feats = oracle_features(split)
    if feats.shape[1] > n_latents or feats.shape[2] > width:
        raise ValueError(f"oracle features {tuple(feats.shape[1:])} do not fit media of "
                         f"{n_latents} latents x {width}")
    out = torch.zeros(len(feats), n_latents, width)
    out[:, :feats.shape[1], :feats.shape[2]] = ORACLE_SCALE * feats
    return out


def _batch(rows: list[BindingRow], media: torch.Tensor, pad: int):
    """x [B, L] right-padded, the index of each row's last token, answers [B], media [B, M, d]."""
    x = torch.full((len(rows), max(len(r.ids) for r in rows)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r.ids)] = torch.tensor(r.ids)
    last = torch.tensor([len(r.ids) - 1 for r in rows])
    answers = torch.tensor([r.answer for r in rows])
    return x, last, answers, media[[r.image for r in rows]]


def answer_logits(model: nn.Module, rows: list[BindingRow], media: torch.Tensor, pad: int,
                  capacity_factor=CONFIGURED_CAPACITY) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at each question's last token [B, V] (the answer's prediction), answers [B].
    ``capacity_factor``: the run's own (the default) or None (dropless)."""
    x, last, answers, m = _batch(rows, media, pad)
    logits = model(x, media=m, media_pos=torch.zeros(len(rows), 1, dtype=torch.long),
                   capacity_factor=capacity_factor)
    return logits[torch.arange(len(rows)), last].float(), answers


@torch.no_grad()
def binding_accuracy(model: nn.Module, rows: list[BindingRow], media: torch.Tensor, pad: int,
                     yes: int, no: int, capacity_factor=CONFIGURED_CAPACITY,
                     batch: int = 256) -> float:
    """Share of rows whose answer's first token has the higher logit of yes / no."""
    was_training = model.training
    model.eval()
    right = 0
    try:
        for lo in range(0, len(rows), batch):
            logits, answers = answer_logits(model, rows[lo:lo + batch], media, pad,
                                            capacity_factor)
            pred = torch.where(logits[:, yes] > logits[:, no], yes, no)
            right += int((pred == answers).sum())
    finally:
        model.train(was_training)
    return right / len(rows)


def train_on_binding(model: nn.Module, train_rows: list[BindingRow], train_media: torch.Tensor,
                     val_rows: list[BindingRow], val_media: torch.Tensor, *, pad: int, yes: int,
                     no: int, steps: int, batch: int, lr: float, eval_every: int,
                     seed: int = 0, capacity_factor=CONFIGURED_CAPACITY,
                     log=None) -> list[dict]:
    """Train every parameter but the encoder's and resampler's (frozen, as in the config) on
    batches of ``train_rows``; returns {step, questions, loss, val_exists, seconds} at step 0
    and every ``eval_every`` steps (loss: the mean of the steps since the last record)."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".", 1)[0] not in PRETRAINED_MODULES)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng([seed, 25])
    model.train()
    start, losses = time.perf_counter(), []
    curve = [{"step": 0, "questions": 0, "loss": float("nan"), "seconds": 0.0,
              "val_exists": binding_accuracy(model, val_rows, val_media, pad, yes, no,
                                             capacity_factor)}]
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / WARMUP_STEPS)
        rows = [train_rows[i] for i in rng.integers(0, len(train_rows), batch)]
        logits, answers = answer_logits(model, rows, train_media, pad, capacity_factor)
        loss = F.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "questions": step * batch,
                          "loss": float(np.mean(losses)),
                          "val_exists": binding_accuracy(model, val_rows, val_media, pad, yes,
                                                         no, capacity_factor),
                          "seconds": time.perf_counter() - start})
            losses = []
            if log is not None:
                log(curve[-1])
    return curve
