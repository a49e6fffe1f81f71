"""Speculative decoding inside continuous batching: per-request options and batched proposals.

    sched = Scheduler(Engine(target, 8), draft=Engine(draft_model, 8))   # draft: optional
    sched.submit(Request(prompt, params, speculative=Speculation("ngram", num_tokens=4)))
    sched.submit(Request(prompt, params, speculative=Speculation("draft_model", 4)))
    sched.submit(Request(prompt, params))                                 # no speculation

How a scheduler step speculates (moe/inference/scheduler.py), as vLLM's V1 engine does it
(``vllm/v1/spec_decode/``: the n-gram and draft-model proposers run before the target's
forward; ``vllm/v1/sample/rejection_sampler.py``: one target forward scores every request's
drafts, packed with the requests that draw one token, and each request's drafts are accepted
or rejected on their own, greedy by argmax, sampled by the Leviathan et al. rule):

1. every running request that speculates gets a budget g: its ``num_tokens``, cut to the
   cache's room (the target verifies g + 1 tokens) and to its ``max_new_tokens`` (g + 1 may
   be emitted); near the end of the cache g is 0 and the request takes a plain step;
2. ``propose_batch``: prompt lookup copies from the request's own context (``propose_ngram``,
   no state: the per-request "state" is the context itself); a draft model drafts in its own
   ``Engine`` whose slots mirror the target's: one ragged forward feeds each slot what it lacks
   of the context (the whole prompt after admission, then one token, or two after a bonus),
   then one batched decode per drafted position (rows leave when their g is reached), each row
   sampling from its request's filtered distribution with the request's own generator;
3. ONE target forward (``Engine.append``: rows right-padded, each [last token, drafts]; a
   request not speculating is a row of one token) gives every row's q;
4. per row, ``moe.inference.speculative.accept`` (the same rule as ``SpeculativeDecoder``:
   the request's generator, its min_tokens suppression per position), then both caches roll
   back (``Engine.truncate``) to the tokens kept.

What we did not take from vLLM: its padding-free flattened batch (our model takes [B, S], so a
speculating batch is padded to the longest row: a plain row beside a verify of 5 costs its 4
padded tokens' expert work), its CUDA-graph / Triton kernels, and its per-batch draft length
(ours is per request). Exactness is as ``SpeculativeDecoder``'s: greedy gives the target's own
tokens; sampled tokens are distributed as the target's, and a seeded request draws the same
tokens whatever else runs beside it (its draws depend only on its own context and budget).
Routing must be dropless (a verify's tokens would compete for capacity where decode never
drops): the scheduler refuses a capacity with speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.inference.engine import Engine
from moe.inference.ngram import propose_ngram
from moe.inference.sampling import SamplingParams, probs, sample_from
from moe.inference.speculative import Proposal

METHODS = ("ngram", "draft_model")  # vLLM's names: prompt lookup, a small draft model
MAX_SPECULATIVE_TOKENS = 16  # the most proposed per step, a bound on a verify's width


def _check_int(name: str, v, lo: int, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v!r} must be an integer {'in ' if hi else ''}{rng}")


@dataclass(frozen=True)
class Speculation:
    """How one request speculates: ``method`` "ngram" (prompt lookup, the context's last
    ``max_ngram`` .. ``min_ngram`` tokens matched) or "draft_model" (the scheduler's draft),
    up to ``num_tokens`` proposed per step. Invalid values raise ValueError naming the field."""

    method: str
    num_tokens: int = 4
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method={self.method!r} must be one of {METHODS}")
        _check_int("num_tokens", self.num_tokens, 1, MAX_SPECULATIVE_TOKENS)
        _check_int("max_ngram", self.max_ngram, 1)
        _check_int("min_ngram", self.min_ngram, 1)
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram={self.min_ngram} must be <= max_ngram="
                             f"{self.max_ngram}")


@dataclass
class Row:
    """One speculating request in a step: its slot, its context (prompt + generated), the
    most it may propose, how, and what it samples with."""

    slot: int
    ctx: list[int]
    budget: int
    spec: Speculation
    params: SamplingParams
    generator: torch.Generator | None


def propose_batch(rows: Sequence[Row], draft: Engine | None) -> tuple[dict[int, Proposal], int]:
    """Each row's proposal (by slot; possibly empty: no n-gram match, or no room left in the
    draft's cache), and the draft forwards taken."""
    out: dict[int, Proposal] = {}
    drafting: list[tuple[Row, int]] = []
    for r in rows:
        if r.spec.method == "ngram":
            out[r.slot] = Proposal(propose_ngram(r.ctx, r.budget, r.spec.max_ngram,
                                                 r.spec.min_ngram))
            continue
        if draft is None:
            raise ValueError("a draft_model request needs the scheduler's draft engine")
        # The draft holds a prefix of the context; after the catch-up it holds the whole
        # context and g - 1 decodes add the drafts but the last: len(ctx) + g - 1 <= max_len.
        g = min(r.budget, draft.max_len - len(r.ctx) + 1)
        if g >= 1:
            drafting.append((r, g))
        else:
            out[r.slot] = Proposal([])
    forwards = 0
    if drafting:
        out.update(_draft(draft, drafting))
        forwards = max(g for _, g in drafting)
    return out, forwards


def _draft(draft: Engine, rows: list[tuple[Row, int]]) -> dict[int, Proposal]:
    """Autoregressive drafts for every row at once (as ``DraftModel.propose``, batched)."""
    feed = [r.ctx[draft.length(r.slot):] for r, _ in rows]
    logits = [x[-1] for x in draft.append([r.slot for r, _ in rows], feed)]
    tokens: dict[int, list[int]] = {r.slot: [] for r, _ in rows}
    dists: dict[int, list[torch.Tensor]] = {r.slot: [] for r, _ in rows}
    active = rows
    for i in range(max(g for _, g in rows)):
        if i:
            active = [(r, g) for r, g in active if g > i]
            logits = list(draft.decode([r.slot for r, _ in active],
                                       [tokens[r.slot][-1] for r, _ in active]))
        for (r, _), x in zip(active, logits):
            if r.params.greedy:
                tokens[r.slot].append(int(x.argmax()))
            else:
                p = probs(x, r.params)
                dists[r.slot].append(p)
                tokens[r.slot].append(int(sample_from(p[None], r.generator)[0]))
    return {r.slot: Proposal(tokens[r.slot], torch.stack(dists[r.slot]) if dists[r.slot]
                             else None, forwards=g) for r, g in rows}
