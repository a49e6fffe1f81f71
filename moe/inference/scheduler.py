"""Continuous batching: a fixed set of KV-cache slots shared by a queue of requests.

    sched = Scheduler(Engine(model, n_slots=8), detokenize=tokenizer.decode)
    req = sched.submit(Request(prompt_ids, SamplingParams(max_new_tokens=64), seed=1))
    while sched.has_work:
        for r in sched.step():          # the requests that changed this step
            print(r.id, r.tokens[-1:], r.finish_reason)

Each ``step`` (as in Orca, Yu et al. 2022, and vLLM's scheduler, at the granularity of one
token): queued requests are admitted, first come first served, into the free slots and
prefilled together (one ragged prefill); every other running request decodes one token, all
in one batched ``Engine.decode``; a request that finishes (a stop token, a stop string, its
``max_new_tokens``) frees its slot at once, and the next step refills it from the queue.
Static batching, by contrast, starts the next batch only when the longest request of the
current one is done (``Engine.generate``); the decode benchmark (moe/bench/decode.py,
``continuous_over_static``) measures the difference on mixed output lengths.

Exactness: a request gets the tokens it gets alone (``Engine.generate([prompt], params,
generator)``): the engine keeps each slot's positions, so batching never changes a
sequence's logits (dropless routing, to float noise), each request samples with its own
``torch.Generator`` (seeded ``seed``) exactly once per token, and a sequence past the cache's
``max_len`` slides its window the way ``Engine.stream`` does (a re-prefill of the last
``max_len`` tokens). A new request's first token comes from its prefill, in the same step
where the running ones decode, so admitting never stalls the others for a step.

Speculative decoding (``Request.speculative``, moe/inference/spec_batch.py): a request that
speculates gets up to ``num_tokens`` proposed tokens per step (prompt lookup, or the
``draft`` engine's model, which keeps its own cache slot per request), and the step's one
target forward verifies them beside the other requests' single tokens (rows right-padded,
``Engine.append``); each row is accepted on its own (``moe.inference.speculative.accept``,
with the request's generator) and both caches are rolled back to the tokens kept. Several
tokens may then come in one step; they are appended one by one, so a stop token, a stop string
or ``max_new_tokens`` inside an accepted run ends the request there and nothing after it is
emitted, and each token's logprobs are the target's at its position, as a plain step's.
The proposal is cut to what fits: the cache's room (g + 1 positions; none near the end, where
the request takes plain steps and, past ``max_len``, slides) and ``max_new_tokens`` (g + 1
tokens). Greedy gives token for token the output without speculation; sampled, the target's
distribution (tests/test_speculative_serving.py).

Stop strings need text: with ``detokenize`` (token ids -> str) the scheduler keeps each
request's ``text`` (the generated tokens decoded, a final stop token left out) and ends the
request when a stop string appears, cutting ``text`` where it begins (OpenAI's behaviour: the
stop string is not returned). The finish reasons are OpenAI's: "stop" and "length".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from moe.inference.engine import Engine
from moe.inference.sampling import (
    SamplingParams,
    TokenLogprob,
    sample,
    suppress_stops,
    token_logprobs,
)
from moe.inference.spec_batch import Row, Speculation, propose_batch
from moe.inference.speculative import Proposal, SpeculativeStats, accept


@dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its state (read it; the scheduler writes it)."""

    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # draws from a torch.Generator seeded with this (None: global RNG)
    stop_strings: tuple[str, ...] = ()
    id: Hashable = None
    # With each generated token, its log-probability and the ``logprobs`` most likely tokens
    # (None: none). ``prompt_logprobs``: the same for every prompt token but the first
    # (OpenAI's echo; with ``max_new_tokens`` 0 the request is a prefill and nothing else).
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # Speculative decoding for this request (None: one token per step); see
    # moe/inference/spec_batch.py. Exact: the same tokens (greedy) or distribution (sampled).
    speculative: Speculation | None = None
    # --- state ---
    tokens: list[int] = field(default_factory=list)  # generated so far (a stop token included)
    text: str = ""  # with a detokenize: the text of ``tokens``, cut before a stop string
    # "stop" (stop token or string), "length", or "error" (``error`` says why: this request
    # alone failed, e.g. its sampling; the others in the batch go on)
    finish_reason: str | None = None
    error: str | None = None
    slot: int | None = None  # the cache slot while running
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token made
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt[1:]
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, engine: Engine,
                 detokenize: Callable[[list[int]], str] | None = None,
                 draft: Engine | None = None):
        """``engine``: its ``n_slots`` is the most requests decoded together. ``detokenize``:
        needed by requests with stop strings (and fills ``Request.text``). ``draft``: the
        draft model's engine for requests speculating with "draft_model" (as many slots as
        ``engine``, the same vocabulary); ``spec_stats`` counts every speculating step."""
        if draft is not None:
            if draft.n_slots != engine.n_slots:
                raise ValueError(f"the draft engine has {draft.n_slots} slots and the "
                                 f"target's {engine.n_slots}: give it one per target slot")
            tv, dv = engine.cfg.vocab_size, draft.cfg.vocab_size
            if tv != dv:
                raise ValueError(f"draft model vocab_size={dv} differs from the target's "
                                 f"vocab_size={tv}: the draft must share the target's tokenizer")
            _check_dropless(engine)
        self.engine = engine
        self.draft = draft
        self.spec_stats = SpeculativeStats(0)  # draft_tokens: per request, not one gamma
        self.detokenize = detokenize
        self.queue: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.free: list[int] = list(range(engine.n_slots))  # lowest slot first
        self.admitted: list[Request] = []  # in order of admission (tests read it)

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def submit(self, request: Request) -> Request:
        """Queue a request; ValueError (before queuing) for a prompt the engine refuses."""
        request.prompt = self.engine.check_prompt(request.prompt)
        request.stop_strings = tuple(request.stop_strings)
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop strings need a Scheduler(detokenize=...) to read the text")
        if any(not isinstance(s, str) or not s for s in request.stop_strings):
            raise ValueError(f"stop strings {request.stop_strings!r} must be non-empty str")
        if request.seed is not None and request.generator is None:
            request.generator = torch.Generator().manual_seed(request.seed)
        if request.logprobs is not None and not 0 <= request.logprobs <= \
                self.engine.cfg.vocab_size:
            raise ValueError(f"logprobs={request.logprobs} must be in [0, vocab_size]")
        spec = request.speculative
        if spec is not None:
            if not isinstance(spec, Speculation):
                raise ValueError(f"speculative={spec!r} must be a Speculation or None")
            _check_dropless(self.engine)
            if spec.method == "draft_model" and self.draft is None:
                raise ValueError("speculative method 'draft_model' needs a draft model "
                                 "(Scheduler(draft=...), moe-serve --draft RUN)")
        if request.prompt_logprobs and request.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many top tokens: 0 or more)")
        if request.params.max_new_tokens == 0 and not request.prompt_logprobs:
            # nothing to generate or to score: finished, never queued
            request.finish_reason = "length"
            return request
        self.queue.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Drop a request (e.g. its client went away): out of the queue, or out of its slot."""
        if request in self.queue:
            self.queue.remove(request)
        elif request.slot is not None and self.running.get(request.slot) is request:
            self._release(request)

    def drop_running(self) -> list[Request]:
        """Drop the running requests (after a step failed: their slots' state is unknown) and
        return them; the queue stays, to be admitted next."""
        dropped = list(self.running.values())
        for r in dropped:
            self._release(r)
        return dropped

    # --- one step --------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Admit into free slots, prefill them, decode the rest; returns the requests that
        got a token or finished this step (finished ones have left their slots)."""
        changed: list[Request] = []
        decoding = list(self.running.values())  # admitted before this step: one decode each
        new: list[Request] = []
        while self.queue and self.free:
            r = self.queue.popleft()
            r.slot = self.free.pop(0)
            self.running[r.slot] = r
            self.admitted.append(r)
            new.append(r)
        logits: dict[int, torch.Tensor] = {}
        if new:
            if any(r.prompt_logprobs for r in new):
                out = self.engine.prefill([r.slot for r in new], [r.prompt for r in new],
                                          every_position=True)
                for r, rows in zip(new, out):
                    if r.prompt_logprobs:  # row i scores prompt token i + 1
                        r.prompt_token_logprobs = token_logprobs(rows[:-1], r.prompt[1:],
                                                                 r.logprobs)
                out = [rows[-1] for rows in out]
            else:
                out = self.engine.prefill([r.slot for r in new], [r.prompt for r in new])
            logits.update(zip((r.slot for r in new), out))
            for r in [r for r in new if r.params.max_new_tokens == 0]:  # scored, nothing more
                r.finish_reason = "length"
                self._release(r)
                changed.append(r)
                new.remove(r)
        fits = [r for r in decoding if self.engine.length(r.slot) < self.engine.max_len]
        proposals = self._propose(fits)
        verifying: dict[int, torch.Tensor] = {}  # slot -> [g + 1, V]: q over [last, drafts]
        if fits and not proposals:
            out = self.engine.decode([r.slot for r in fits], [r.tokens[-1] for r in fits])
            logits.update(zip((r.slot for r in fits), out))
        elif fits:  # one forward: verifies beside one-token rows (moe/inference/spec_batch.py)
            rows = [[r.tokens[-1], *proposals[r.slot].tokens] if r.slot in proposals
                    else [r.tokens[-1]] for r in fits]
            for r, out in zip(fits, self.engine.append([r.slot for r in fits], rows)):
                if r.slot in proposals:
                    verifying[r.slot] = out
                else:
                    logits[r.slot] = out[-1]
        for r in decoding:
            if r.slot not in logits and r.slot not in verifying:
                # the window slides: re-prefill the last max_len tokens
                seq = (list(r.prompt) + r.tokens)[-self.engine.max_len:]
                logits[r.slot] = self.engine.prefill([r.slot], [seq])[0]
        for r in [r for r in decoding if r.slot in verifying]:
            self._verify(r, verifying[r.slot], proposals[r.slot])
            changed.append(r)
        active = new + [r for r in decoding if r.slot in logits]
        for r, tok in zip(active, self._sample(active, logits)):
            if tok is None:  # its sampling failed: it alone ends, with the reason
                self._release(r)
                changed.append(r)
                continue
            if r.logprobs is not None:
                r.token_logprobs += token_logprobs(logits[r.slot][None], [tok], r.logprobs)
            self._append(r, tok)
            changed.append(r)
        return changed

    def _sample(self, rows: list[Request], logits: dict[int, torch.Tensor]) -> list[int | None]:
        """One token per request, each from its own generator: a batched argmax when all
        are greedy (the engine's rule), else ``sample`` row by row (the one filter), each row
        in its own guard: a row that fails gets None and its request the error, and the
        others are sampled as if it were not there."""
        if not rows:
            return []
        logits = {r.slot: suppress_stops(logits[r.slot], r.params, len(r.tokens)) for r in rows}
        if all(r.params.greedy for r in rows):
            return torch.stack([logits[r.slot] for r in rows]).argmax(-1).tolist()
        out: list[int | None] = []
        for r in rows:
            try:
                out.append(int(sample(logits[r.slot][None], r.params, r.generator)[0]))
            except (RuntimeError, ValueError) as e:
                r.finish_reason, r.error = "error", f"sampling failed: {e}"
                out.append(None)
        return out

    def _propose(self, fits: list[Request]) -> dict[int, Proposal]:
        """Non-empty proposals of the speculating requests among ``fits``, by slot. A request
        may propose g tokens if the target's cache has room for g + 1 more (its length grows
        by the verify's width) and its ``max_new_tokens`` for g + 1 more tokens."""
        rows = []
        for r in fits:
            if r.speculative is None:
                continue
            room = self.engine.max_len - self.engine.length(r.slot) - 1
            left = r.params.max_new_tokens - len(r.tokens) - 1
            g = min(r.speculative.num_tokens, room, left)
            if g >= 1:
                rows.append(Row(r.slot, [*r.prompt, *r.tokens], g, r.speculative, r.params,
                                r.generator))
            else:
                self.spec_stats.plain_calls += 1
        if not rows:
            return {}
        proposals, forwards = propose_batch(rows, self.draft)
        self.spec_stats.draft_calls += forwards
        self.spec_stats.plain_calls += sum(not p.tokens for p in proposals.values())
        return {slot: p for slot, p in proposals.items() if p.tokens}

    def _verify(self, r: Request, q_logits: torch.Tensor, prop: Proposal) -> None:
        """Accept / resample one verified row, roll both caches back to the tokens kept, and
        append what came out, token by token (a stop or max_new_tokens cuts the run there;
        each token's logprobs are the target's at its position, as a plain step's)."""
        g = len(prop.tokens)
        try:
            n, nxt, alpha = accept(q_logits, prop, r.params, r.generator, len(r.tokens))
        except (RuntimeError, ValueError) as e:
            r.finish_reason, r.error = "error", f"sampling failed: {e}"
            self._release(r)
            return
        kept = self.engine.length(r.slot) - g + n  # the context but its last token: nxt
        self.engine.truncate(r.slot, kept)
        if self.draft is not None:
            self.draft.truncate(r.slot, min(self.draft.length(r.slot), kept))
        self.spec_stats.record(g, n, alpha)
        for i, tok in enumerate([*prop.tokens[:n], nxt]):
            if r.logprobs is not None:
                r.token_logprobs += token_logprobs(q_logits[i][None], [tok], r.logprobs)
            self._append(r, tok)
            if r.finished:
                return

    def _append(self, r: Request, tok: int) -> None:
        r.tokens.append(tok)
        p = r.params
        stopped = tok in p.stop_tokens
        if self.detokenize is not None:
            r.text = self.detokenize(r.tokens[:-1] if stopped else r.tokens)
            cut = [i for i in (r.text.find(s) for s in r.stop_strings) if i >= 0]
            if cut:
                r.text, stopped = r.text[:min(cut)], True
        if stopped:
            r.finish_reason = "stop"
        elif len(r.tokens) >= p.max_new_tokens:
            r.finish_reason = "length"
        if r.finished:
            self._release(r)

    def _release(self, r: Request) -> None:
        del self.running[r.slot]
        self.free.append(r.slot)
        self.free.sort()
        self.engine.reset(r.slot)
        if self.draft is not None:
            self.draft.reset(r.slot)
        r.slot = None

    # --- offline use -----------------------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> list[list[int]]:
        """Submit ``requests``, step until all are done; their generated tokens, in order."""
        requests = [self.submit(r) for r in requests]
        while self.has_work:
            self.step()
        return [r.tokens for r in requests]


def _check_dropless(engine: Engine) -> None:
    if engine.capacity_factor is not None:
        raise ValueError(f"speculative decoding is dropless: the engine's capacity_factor="
                         f"{engine.capacity_factor} must be None (a verify's tokens would "
                         "compete for expert capacity where one-token steps never drop)")


def static_batches(engine: Engine, requests: Sequence[Request]) -> list[list[int]]:
    """The baseline: batches of ``engine.n_slots`` requests in order, each run to its longest
    request's end before the next starts (``Engine.generate``; a finished row idles)."""
    out: list[list[int]] = []
    n = engine.n_slots
    for i in range(0, len(requests), n):
        batch = requests[i:i + n]
        gens = [r.generator if r.generator is not None or r.seed is None
                else torch.Generator().manual_seed(r.seed) for r in batch]
        out += engine.generate([r.prompt for r in batch], [r.params for r in batch], gens)
    return out
