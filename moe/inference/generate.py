"""Sampling from a model in one call: ``generate(model, prompt, max_new_tokens=..., ...)``.

A thin layer over ``moe.inference.Engine`` (KV cache, dropless routing, the few-token MoE
decode path); ``moe.inference.sampling`` says what temperature, top_k and top_p do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe.inference import Engine, SamplingParams
from moe.inference.speculative import SpeculativeDecoder
from moe.model.router import check_causal


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
             draft_model: nn.Module | None = None, draft_tokens: int = 4,
             capacity_factor: float | None = None) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompt: [B, S] token ids, or a list of B token lists of any lengths (each row's output is
    the one it gets alone; greedy: the same tokens). Returns the same kind: [B, S + n] ids
    (n the most any row made; a row that stopped early is padded with the stop token it
    emitted, as Hugging Face pads with eos), or B lists of prompt + new tokens.

    temperature=0 is greedy; top_k=0 and top_p=1 keep every token; a row stops after emitting
    any of ``stop_tokens`` (e.g. ``(0,)``, ``<|endoftext|>``). ``generator``: the seeded
    source of every draw (rows draw in order). The context is ``model.cfg.max_seq_len``: a
    longer prompt is a ValueError, and past it the window slides. Routing is dropless unless
    ``capacity_factor`` is given (see moe/inference/engine.py for what it means at decode).
    ``draft_model``: speculative decoding (moe/inference/speculative.py) with ``draft_tokens``
    drafted per target call: a model with the same vocabulary; one prompt (batch 1), dropless;
    greedy gives the target's own tokens, sampling the target's distribution (the draws
    differ from those without a draft). For its acceptance statistics use
    ``SpeculativeDecoder``. The models' training modes are restored afterwards.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_tokens=tuple(stop_tokens))
    check_causal(model, "generation")
    as_tensor = isinstance(prompt, torch.Tensor)
    if as_tensor and prompt.dim() != 2:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)}: want [batch, seq] token ids")
    rows = prompt.tolist() if as_tensor else [list(map(int, p)) for p in prompt]
    if not rows:
        raise ValueError("no prompts")
    if draft_model is not None:
        if len(rows) != 1:
            raise ValueError(f"speculative decoding (draft_model) takes one prompt (batch 1), "
                             f"not {len(rows)}")
        if capacity_factor is not None:
            raise ValueError("speculative decoding is dropless: capacity_factor must be None")
    modes = [(m, m.training) for m in (model, draft_model) if m is not None]
    try:
        if draft_model is None:
            engine = Engine(model, n_slots=len(rows), capacity_factor=capacity_factor)
            new = engine.generate(rows, params, generator)
        else:
            spec = SpeculativeDecoder(model, draft_model, draft_tokens)
            new = [spec.generate(rows[0], params, generator)]
    finally:
        for m, mode in modes:
            m.train(mode)
    if not as_tensor:
        return [p + n for p, n in zip(rows, new)]
    width = max(len(n) for n in new)
    out = prompt.new_empty(len(rows), prompt.shape[1] + width)
    out[:, :prompt.shape[1]] = prompt
    for b, n in enumerate(new):
        pad = n[-1:] * (width - len(n))  # only a stopped row is short: its stop token
        out[b, prompt.shape[1]:] = torch.tensor(n + pad, dtype=out.dtype)
    return out
