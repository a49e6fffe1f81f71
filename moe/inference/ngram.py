"""Prompt lookup: speculative decoding's proposals copied from the context, no draft model.

    dec = SpeculativeDecoder(target, NgramProposer(max_ngram=3), draft_tokens=4)

Saxena's "prompt lookup decoding" (2023), Hugging Face's ``generate(prompt_lookup_num_tokens=
...)`` and vLLM's ``ngram`` speculator: code, edits and summaries repeat their context, so the
tokens that followed an earlier occurrence of the context's last few tokens are good guesses.
``propose_ngram`` tries n = ``max_ngram`` down to ``min_ngram`` and takes, for the first n that
occurs earlier, its most recent earlier occurrence (Hugging Face and vLLM take the first one
in the context; the most recent is the nearest code, and the period of a loop); it proposes
the k tokens that followed. Where those run into the end of the context the copy goes on
from its own start (LZ77's overlapping copy): after "a b c a b" the 2-gram "a b" proposes
"c a b c ..." up to k, where Hugging Face stops at the context's end ("c a b").

A proposal is a function of the context, so as a draft distribution it is one-hot: the
decoder accepts x_i with probability q(x_i), and exactly q's own output comes out, greedy or
sampled (moe/inference/speculative.py). No match: nothing is proposed and the step is a plain
target step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe.inference.sampling import SamplingParams
from moe.inference.speculative import Proposal


def propose_ngram(ctx: Sequence[int], k: int, max_ngram: int = 3,
                  min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the last n tokens
    of ``ctx``, for the largest n in [min_ngram, max_ngram] that has one; [] if none does."""
    size = len(ctx)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = list(ctx[size - n:])
        last = tail[-1]
        for end in range(size - 2, n - 2, -1):  # end: the last index of an earlier occurrence
            if ctx[end] == last and list(ctx[end - n + 1:end + 1]) == tail:
                out: list[int] = []
                for i in range(end + 1, end + 1 + k):  # ctx + out, read from end + 1 on
                    out.append(ctx[i] if i < size else out[i - size])
                return out
    return []


class NgramProposer:
    """Prompt lookup as a ``SpeculativeDecoder`` proposer (no model, no state of its own)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram={min_ngram} must be <= max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, ctx: list[int]) -> None:
        pass

    def propose(self, ctx: list[int], g: int, params: SamplingParams,
                gen: torch.Generator | None) -> Proposal:
        return Proposal(propose_ngram(ctx, g, self.max_ngram, self.min_ngram))

    def rollback(self, kept: int) -> None:
        pass
