"""Sampling from a trained model (no KV cache: the toy models here are small)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, max_seq_len: int,
             temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt: [1, S] token ids -> [1, S + max_new_tokens]. top_k=0 samples from all tokens."""
    was_training = model.training
    model.eval()
    idx = prompt
    for _ in range(max_new_tokens):
        logits = model(idx[:, -max_seq_len:])[:, -1, :].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)
        idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
    model.train(was_training)
    return idx
