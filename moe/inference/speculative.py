"""Speculative decoding: a proposer guesses tokens, the target verifies them at once.

    dec = SpeculativeDecoder(target, draft, draft_tokens=4)
    new = dec.generate(prompt, SamplingParams(max_new_tokens=64, temperature=0.8), generator)
    dec.stats.acceptance_rate, dec.stats.acceptance_rate_predicted   # measured vs 1 - TV(p, q)
    dec = SpeculativeDecoder(target, NgramProposer(), draft_tokens=4)  # prompt lookup

The proposer is a small draft model (``DraftModel``, made from the ``nn.Module`` given) or
prompt lookup (``moe.inference.ngram.NgramProposer``: the tokens that followed the last
n-gram's previous occurrence). A proposer chosen deterministically from the context is a
draft distribution p that is one-hot on its token, so the same rule below applies: accept
x_i with probability q(x_i); a rejection resamples from norm(max(0, q - p)), which is q
with x_i removed and renormalised.

The rule of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding") and Chen et al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"). Each
step, with p the draft's and q the target's distribution, both after the same temperature /
top-k / top-p filter (``moe.inference.sampling.probs``):

1. the proposer gives up to gamma tokens x_1..x_gamma (a draft model samples them
   autoregressively from p, with its own KV cache; none given: a plain target step);
2. the target runs ONE forward over [last token, x_1..x_gamma] (gamma + 1 positions), giving
   q at each drafted position and one more;
3. x_i is accepted with probability min(1, q(x_i) / p(x_i)), in order; at the first rejection
   the next token is drawn from norm(max(0, q - p)) at that position and the rest dropped; if
   all gamma are accepted a bonus token is drawn from q at the last position;
4. the target's cache (and a draft model's) is rolled back (``Engine.truncate``) to the
   tokens kept.

Every emitted token is then distributed exactly as the target's sample (Leviathan et al.,
Theorem 1); the test is tests/test_speculative.py. Greedy (temperature 0): p and q are one-hot,
so the rule becomes "accept iff x_i is the target's argmax", and the output is the target's own
greedy output token for token; greedy draws no random numbers.

Expected rates (Leviathan et al., sections 3.1-3.3): one accept test passes with probability
alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q), and with i.i.d. alpha a target call yields
(1 - alpha^(gamma + 1)) / (1 - alpha) tokens. ``SpeculativeStats`` reports the measured rates
beside these predictions. The measured acceptance rate is accepted / accept tests run (a test
runs at each position up to the first rejection), and the predicted one is the mean of
1 - TV(p, q) over the same positions: each test passes with exactly its alpha given the past,
so the two agree up to sampling noise (binomial, about sqrt(a(1-a)/tests)).

Bookkeeping: the target's cache always holds the context but its last token (that token
starts the next verify); a draft model's holds a prefix of the context (``DraftModel``).
Near the end of the context gamma shrinks to fit both caches; with no room left, or nothing
proposed, the token is one plain target step, exactly as the engine alone takes it (past
``max_len`` the window slides: a re-prefill per token).

``SpeculativeDecoder`` decodes one sequence at a time (``moe.inference.generate.generate``
refuses a batch with a draft); the continuous-batching scheduler speculates for many requests
at once with the same ``accept`` (moe/inference/spec_batch.py).
Routing is dropless: a verify forward is one row of gamma + 1 tokens, and a capacity would
let those tokens compete for expert slots where single-token decoding never drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moe.inference.engine import Engine
from moe.inference.sampling import SamplingParams, probs, sample, sample_from, suppress_stops


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)) over the last dim: where a rejected position resamples from.

    A rejection implies q(x) < p(x) for the drafted x, so the mass is > 0 in exact arithmetic;
    if rounding leaves none (p and q equal to the last bit), q itself is returned.
    """
    r = (q - p).clamp_min(0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(torch.finfo(r.dtype).tiny), q)


def verify(tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept / resample step on given distributions (independent rows).

    tokens [B, G]: drafted ids; p [B, G, V]: the draft distributions they were drawn from;
    q [B, G + 1, V]: the target's at the same positions and one more. Returns (n [B], next
    [B]): row b keeps ``tokens[b, :n[b]]`` followed by ``next[b]``, drawn from
    norm(max(0, q - p)) at position n if n < G, else from q at position G (the bonus).
    Random numbers: G uniforms per row, then one inverse-CDF draw per row.
    """
    b, g = tokens.shape
    if p.shape[:2] != (b, g) or q.shape[:2] != (b, g + 1) or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"verify: tokens {tuple(tokens.shape)}, p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}: want [B, G], [B, G, V], [B, G + 1, V]")
    p = p.to(q.device, q.dtype)
    tokens = tokens.to(q.device)
    pt = p.gather(-1, tokens[..., None])[..., 0]  # [B, G] p(x_i)
    qt = q[:, :g].gather(-1, tokens[..., None])[..., 0]  # [B, G] q(x_i)
    dev = generator.device if generator is not None else q.device
    u = torch.rand(b, g, generator=generator, device=dev).to(q.device)
    accept = u * pt < qt  # u < q/p without a division; u in [0, 1): q >= p always passes
    n = accept.long().cumprod(-1).sum(-1)  # leading accepts
    rows = torch.arange(b, device=q.device)
    at = n.clamp(max=g - 1)
    dist = torch.where((n == g)[:, None], q[:, g], residual(p[rows, at], q[rows, at]))
    return n, sample_from(dist, generator)


def accept(q_logits: torch.Tensor, prop: Proposal, params: SamplingParams,
           gen: torch.Generator | None, n_made: int = 0) -> tuple[int, int, float]:
    """One row's verify: q_logits [g + 1, V], the target's raw logits over the last token and
    the g proposed ones; returns (n accepted, the next token, alpha: the sum of 1 - TV(p, q)
    over the tested positions). Greedy: accept while the proposal is q's argmax (no random
    numbers); sampled: ``verify`` with p one-hot for a deterministic proposal. Position i's
    stop tokens are suppressed while ``n_made + i < params.min_tokens`` (``suppress_stops``:
    a token is drawn where the row has made n_made + i)."""
    drafted = prop.tokens
    g = len(drafted)
    if params.min_tokens and params.stop_tokens:
        q_logits = torch.stack([suppress_stops(q_logits[i], params, n_made + i)
                                for i in range(g + 1)])
    if params.greedy:
        best = q_logits.argmax(-1).tolist()
        n = 0
        while n < g and drafted[n] == best[n]:
            n += 1
        return n, best[n], float(n)  # one-hot p, q: 1 - TV is 1 where the argmaxes agree
    q = probs(q_logits, params)
    if prop.probs is None:  # a deterministic proposal: p one-hot on each token
        ids = torch.tensor(drafted, device=q.device)[:, None]
        p = torch.zeros_like(q[:g]).scatter_(-1, ids, 1.0)
    else:
        p = prop.probs[:g].to(q.device)
    n_t, nxt_t = verify(torch.tensor([drafted]), p[None], q[None], gen)
    n = int(n_t[0])
    return n, int(nxt_t[0]), float(torch.minimum(p, q[:g]).sum(-1)[:min(n + 1, g)].sum())


def predicted_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma + 1)) / (1 - alpha): expected tokens per target call (Leviathan
    et al., eq. 1), gamma + 1 at alpha = 1."""
    if alpha >= 1:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class SpeculativeStats:
    """Counts over every ``generate`` / ``stream`` call since construction (or ``reset``)."""

    draft_tokens: int  # gamma asked for (a step near the context's end may draft fewer)
    target_calls: int = 0  # verify forwards (the prompt's prefill not counted)
    draft_calls: int = 0  # draft model forwards (0 with prompt lookup)
    drafted: int = 0  # tokens proposed
    tests: int = 0  # accept tests run (positions up to and including the first rejection)
    accepted: int = 0
    emitted: int = 0  # tokens the verify calls yielded (accepted + 1 each, before any cut)
    alpha_sum: float = 0.0  # sum of 1 - TV(p, q) over the tested positions
    plain_calls: int = 0  # target-alone steps (no room left to draft, or nothing proposed)
    gammas: dict[int, int] = field(default_factory=dict)  # drafted per step -> steps

    def reset(self) -> None:
        self.__init__(self.draft_tokens)

    def record(self, g: int, n: int, alpha: float) -> None:
        """One verify of g proposed tokens that accepted n (``accept``'s alpha)."""
        self.target_calls += 1
        self.drafted += g
        self.tests += min(n + 1, g)
        self.accepted += n
        self.emitted += n + 1
        self.alpha_sum += alpha
        self.gammas[g] = self.gammas.get(g, 0) + 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.tests if self.tests else float("nan")

    @property
    def acceptance_rate_predicted(self) -> float:
        return self.alpha_sum / self.tests if self.tests else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted / self.target_calls if self.target_calls else float("nan")

    @property
    def tokens_per_target_call_predicted(self) -> float:
        """(1 - a^(g + 1)) / (1 - a) at the predicted a, averaged over the steps' g."""
        if not self.target_calls:
            return float("nan")
        a = self.acceptance_rate_predicted
        return sum(n * predicted_tokens_per_call(a, g)
                   for g, n in self.gammas.items()) / self.target_calls

    def to_dict(self) -> dict:
        keys = ("draft_tokens", "target_calls", "draft_calls", "drafted", "tests", "accepted",
                "emitted", "plain_calls", "acceptance_rate", "acceptance_rate_predicted",
                "tokens_per_target_call", "tokens_per_target_call_predicted")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Proposal:
    """What a proposer guesses for the next tokens.

    ``probs`` [len(tokens), V]: the distributions a sampling proposer drew ``tokens`` from;
    None for a token chosen deterministically (verified as a one-hot p). ``forwards``: the
    model forwards it took (0 for prompt lookup)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    forwards: int = 0


class DraftModel:
    """A small model as the proposer: it samples from its own filtered distribution p with its
    own one-slot KV cache, which holds a prefix of the context and is fed what it lacks (one
    token, or two after a bonus: the last drafted token is never in its cache)."""

    def __init__(self, model: nn.Module, *, decode_path: bool = True):
        self.engine = Engine(model, 1, decode_path=decode_path)

    def start(self, ctx: list[int]) -> None:
        """A new sequence: the target will hold ``ctx[:-1]``; so does the draft if it fits."""
        self.engine.reset(0)
        if 1 < len(ctx) <= self.engine.max_len + 1:
            self.engine.prefill([0], [ctx[:-1]])

    def propose(self, ctx: list[int], g: int, params: SamplingParams,
                gen: torch.Generator | None) -> Proposal:
        d = self.engine
        g = min(g, d.max_len - (len(ctx) - 1))  # room in the draft's cache
        if g < 1:
            return Proposal([])
        logits = d.forward([0], torch.tensor([ctx[d.length(0):]]))[0, -1]
        tokens, dists = [], []
        for i in range(g):
            if i:
                logits = d.decode([0], [tokens[-1]])[0]
            if params.greedy:
                tokens.append(int(logits.argmax()))
            else:
                p = probs(logits, params)
                dists.append(p)
                tokens.append(int(sample_from(p[None], gen)[0]))
        return Proposal(tokens, torch.stack(dists) if dists else None, forwards=g)

    def rollback(self, kept: int) -> None:
        """The context's first ``kept`` tokens are final: drop what the draft holds past them."""
        self.engine.truncate(0, min(self.engine.length(0), kept))


class SpeculativeDecoder:
    def __init__(self, target: nn.Module, draft, draft_tokens: int = 4, *,
                 max_len: int | None = None, decode_path: bool = True):
        """``target``: a ``Transformer``; ``draft``: a ``Transformer`` with the same vocabulary
        (the same tokenizer), used through ``DraftModel``, or a proposer (an object with
        ``start``, ``propose`` and ``rollback`` as ``DraftModel``'s, e.g. ``NgramProposer``).
        ``draft_tokens``: gamma, the most proposed per target call. The target gets a one-slot
        engine (``max_len`` caps its context, default its ``max_seq_len``; a draft model's is
        its own ``max_seq_len``)."""
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) \
                or draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens!r} must be an integer >= 1")
        if isinstance(draft, nn.Module):
            tv, dv = target.cfg.vocab_size, draft.cfg.vocab_size
            if tv != dv:
                raise ValueError(f"draft model vocab_size={dv} differs from the target's "
                                 f"vocab_size={tv}: the draft must share the target's tokenizer")
            draft = DraftModel(draft, decode_path=decode_path)
        self.draft_tokens = draft_tokens
        self.target = Engine(target, 1, max_len, decode_path=decode_path)
        self.proposer = draft
        self.stats = SpeculativeStats(draft_tokens)

    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[int]:
        """The new tokens (a stop token included), as ``stream`` yields them."""
        return [t for step in self.stream(prompt, params, generator) for t in step]

    def stream(self, prompt: Sequence[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[list[int]]:
        """Yields the new tokens of each target call (1 to gamma + 1), cut after a stop
        token or at ``max_new_tokens``."""
        if isinstance(prompt, torch.Tensor) and prompt.dim() > 1:
            raise ValueError(f"prompt of shape {tuple(prompt.shape)}: speculative decoding "
                             "takes one sequence (batch 1)")
        if params.min_tokens:
            raise ValueError("min_tokens is not supported with speculative decoding (the "
                             "verify step would have to suppress stops per position)")
        ctx = self.target.check_prompt(prompt)
        if params.max_new_tokens == 0:
            return
        self.target.reset(0)
        if len(ctx) > 1:  # the last prompt token starts the first verify
            self.target.prefill([0], [ctx[:-1]])
        self.proposer.start(ctx)
        made = 0
        while True:
            new = self._step(ctx, params, generator)
            out = []
            for tok in new:
                out.append(tok)
                made += 1
                if tok in params.stop_tokens or made == params.max_new_tokens:
                    yield out
                    return
            ctx.extend(new)
            yield out

    # --- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def _step(self, ctx: list[int], params: SamplingParams,
              gen: torch.Generator | None) -> list[int]:
        t, st = self.target, self.stats
        lt = t.length(0)  # == len(ctx) - 1 while there is room to verify
        g = min(self.draft_tokens, t.max_len - lt - 1)
        # 1. the proposal (a draft model may give fewer tokens near its context's end).
        prop = self.proposer.propose(ctx, g, params, gen) if g >= 1 else Proposal([])
        drafted = prop.tokens[:g]
        g = len(drafted)
        st.draft_calls += prop.forwards
        if g < 1:
            return [self._plain(ctx, params, gen)]
        # 2. one target forward over the last token and the drafts: q at g + 1 positions.
        q_logits = t.forward([0], torch.tensor([[ctx[-1], *drafted]]))[0]  # [g + 1, V]
        # 3. accept / resample.
        n, nxt, alpha = accept(q_logits, Proposal(drafted, prop.probs), params, gen)
        # 4. roll back to the kept tokens (ctx + drafted[:n]; nxt is fed next).
        t.truncate(0, lt + 1 + n)
        self.proposer.rollback(lt + 1 + n)
        st.record(g, n, alpha)
        return drafted[:n] + [nxt]

    def _plain(self, ctx: list[int], params: SamplingParams,
               gen: torch.Generator | None) -> int:
        """One target-alone step, as ``Engine.stream`` takes it (re-prefill once full)."""
        t = self.target
        if t.length(0) < t.max_len:
            logits = t.decode([0], [ctx[-1]])
        else:
            logits = t.prefill([0], [ctx[-t.max_len:]])
        self.stats.plain_calls += 1
        return int(sample(logits, params, gen)[0])
