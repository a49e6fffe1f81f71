"""Sampling controls: one filter from logits to the distribution a token is drawn from.

``filter_logits`` applies, in Hugging Face's order, temperature, then top-k, then top-p
(nucleus, Holtzman et al. 2019); ``probs`` is its softmax and ``sample`` draws from it. Every
caller (the engine, the one-call ``moe.inference.generate.generate``, speculative decoding's
p and q) goes through these, so a distribution is filtered the same way wherever it is used.

- ``temperature=0`` is greedy: the distribution is one-hot on the argmax (the first index on
  a tie, as ``torch.argmax``), and ``sample`` consumes no random numbers. So is any temperature
  below ``SAMPLING_EPS`` (vLLM's rule): dividing logits by 1e-40 makes them infinite, and a
  request asking for it must get the argmax it means, not a failure.
- ``top_k=k``: keep the tokens whose logit is >= the k-th largest (a tie at the k-th value
  keeps all its tokens, as Hugging Face's ``TopKLogitsWarper``); 0 keeps all.
- ``top_p=p``: after top-k, sort by probability (descending; ties by token id) and keep each
  token whose predecessors' total probability is < p: the smallest prefix whose mass reaches
  p. The most likely token is always kept; 1.0 keeps all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

SAMPLING_EPS = 1e-5  # temperatures below this are greedy


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. Invalid values raise ValueError naming the field."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()  # generation ends after emitting one of these
    # No stop token may be drawn before this many new tokens (vLLM's min_tokens): their
    # logits are -inf until then (``suppress_stops``).
    min_tokens: int = 0

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= max(self.max_new_tokens, 0):
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer in "
                             f"[0, max_new_tokens={self.max_new_tokens}]")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError for a temperature < 0 (or NaN), a top_k < 0, a top_p outside (0, 1]."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 "
                         "(0 is greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every token)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 keeps every token)")


def suppress_stops(logits: torch.Tensor, params: SamplingParams, n_made: int) -> torch.Tensor:
    """logits [V] of a row that has made ``n_made`` new tokens, with its stop tokens at -inf
    while ``n_made < params.min_tokens`` (unchanged, not copied, otherwise)."""
    if n_made >= params.min_tokens or not params.stop_tokens:
        return logits
    return logits.index_fill(-1, torch.tensor(params.stop_tokens, device=logits.device),
                             float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> fp32 logits / temperature with -inf outside the kept set.

    At temperature 0 (below ``SAMPLING_EPS``) only the argmax keeps its (unscaled) logit.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature < SAMPLING_EPS:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True, stable=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws from: softmax of ``filter_logits`` (one-hot if greedy)."""
    return filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs [B, V] (non-negative, any positive total) -> [B] ids, by
    inverse CDF: one uniform per row from the generator, on the generator's device (a CPU
    generator draws the same tokens whatever device the model is on); ``inverse_cdf`` says
    why it is exact. ``torch.multinomial`` draws the same distribution from V exponentials a
    row (its one-sample path), 6-12x slower at V = 4096-8192 on a CPU
    (docs/benchmarks.md)."""
    dev = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=dev)
    return inverse_cdf(probs.to(dev), u)[:, 0].to(probs.device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [B, V], u [B, 1] in [0, 1] -> [B, 1]: the first id whose cumulative probability
    exceeds u * total, so id i is drawn for u * total in [cdf(i - 1), cdf(i)): with u uniform,
    with probability p_i / total. A zero-probability id has an empty interval (cdf(i) =
    cdf(i - 1) exactly: the CPU cumsum accumulates in double), so it is never drawn; u * total
    is kept below the total (rounding can reach it), where the last id with positive
    probability is the limit from below. Each interval is right to one fp32 ulp of the total
    (about 6e-8 of it), the precision the probabilities themselves carry. ValueError on a
    negative, NaN or infinite entry, or a row with no mass (torch.multinomial's refusals)."""
    probs = probs.float()
    cdf = probs.cumsum(-1)  # [B, V]
    total = cdf[:, -1:]
    if bool((probs.min() < 0) | ~torch.isfinite(total).all() | (total <= 0).any()):
        raise ValueError("cannot sample: probabilities must be finite, >= 0, and each row's "
                         "sum > 0")
    below = torch.nextafter(total, torch.zeros_like(total))  # the largest float < total
    return torch.searchsorted(cdf, torch.minimum(u.to(cdf.dtype) * total, below), right=True)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> [B] token ids: the argmax if greedy, else a draw from ``probs``."""
    if params.greedy:
        return logits.argmax(-1)
    return sample_from(probs(logits, params), generator)


class TokenLogprob(NamedTuple):
    """One token's log-probability under the model, and the ``top`` most likely tokens there
    as (id, logprob) pairs, most likely first (ties by id)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, tokens: list[int] | torch.Tensor,
                   top_n: int = 0) -> list[TokenLogprob]:
    """logits [N, V] (row i's distribution over the token at i) and the N tokens that came:
    each one's log-probability under the model's own distribution (log_softmax of the raw
    logits in fp32, before temperature, top-k/top-p or min_tokens: what the model says,
    as vLLM's default ``raw_logprobs``), with the ``top_n`` most likely tokens."""
    with torch.autocast(logits.device.type, enabled=False):
        logp = torch.log_softmax(logits.float(), -1)
    tokens = torch.as_tensor(tokens, device=logp.device).view(-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    if top_n > 0:
        # Stable descending sort: equal log-probabilities keep id order, whatever the device.
        values, ids = torch.sort(logp, dim=-1, descending=True, stable=True)
        values, ids = values[:, :top_n].tolist(), ids[:, :top_n].tolist()
    else:
        values = ids = [[] for _ in chosen]
    return [TokenLogprob(t, lp, tuple(zip(i, v)))
            for t, lp, i, v in zip(tokens.tolist(), chosen, ids, values)]
