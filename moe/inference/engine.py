"""The inference engine: a model, a KV cache of ``n_slots`` sequences, and its step functions.

    engine = Engine(model, n_slots=4)
    logits = engine.prefill([0, 1], [prompt_a, prompt_b])   # [2, V]: each prompt's last token
    logits = engine.decode([0, 1], [tok_a, tok_b])            # [2, V]: one more token each
    engine.truncate(1, n)                                     # roll slot 1 back to n tokens
    for step in engine.stream(prompts, SamplingParams(...)):  # [(row, token), ...] per step
        ...

Every step appends tokens to slots (``forward(slots, tokens)`` is the general form: S tokens
per row, e.g. a speculative verify of gamma + 1 tokens) and returns their logits; each slot
keeps its own length and positions, so a scheduler may decode any subset of slots together
and refill a finished slot with a new request (continuous batching) while others go on.

Exactness: with dropless routing a cached step gives the logits of the full forward of the
whole sequence (tests/test_inference.py, to 1e-5), and a batch of prompts of different
lengths gives each the tokens it gets alone (a ragged prefill is right-padded: causal
attention and dropless routing keep the padding out of the real tokens).

Capacity at inference: routing is dropless unless ``capacity_factor`` is set. With a factor c
a forward's MoE layers give each expert ceil(c * n * top_k / n_experts) slots (at least
``min_capacity``, at most n) per capacity group of n tokens, a group being
``capacity_group_seqs`` rows of that forward. In a prefill a row is a whole prompt, as in
training; in a decode step a row is one token, so with the default ``capacity_group_seqs=1``
nothing can be dropped at decode (an expert receives a token at most once), and a capacity
only drops prompt tokens in the prefill. Cached decoding then differs from the model's full
forward, where each generated token competed for capacity with its whole sequence; with a
capacity the engine prefills prompts one at a time, so padding never takes a slot.

Past ``max_len`` (default ``model.max_seq_len``) a sequence's window slides as the no-cache
loop's did: the model sees the last ``max_len`` tokens. Rotary positions are absolute, so a
cache cannot slide: each such token costs a full forward (a re-prefill of the window).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from moe.inference.cache import KVCache
from moe.inference.compiled import CompiledDecode
from moe.inference.sampling import SamplingParams, sample, suppress_stops
from moe.model.router import check_causal


class Engine:
    def __init__(self, model: nn.Module, n_slots: int = 1, max_len: int | None = None, *,
                 capacity_factor: float | None = None, decode_path: bool = True,
                 dtype: torch.dtype | None = None, compile: bool | str = False):
        """``model``: a ``Transformer`` (put in eval mode). ``decode_path=False`` runs the
        MoE layers' sorted reference path even for a few tokens (for tests and profiles).
        ``compile``: decode steps (one token per row) run ``torch.compile``d with static shapes
        (moe/inference/compiled.py; a string names the backend, True is inductor); dropless
        routing only."""
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 or None (dropless)")
        if compile and (capacity_factor is not None or not decode_path):
            raise ValueError("compile=True runs the dropless few-token decode path: not with "
                             "a capacity_factor or decode_path=False")
        check_causal(model, "KV-cached decoding (the inference engine)")
        self.model = model.eval()
        self.cfg = model.cfg
        self.cache = KVCache(model, n_slots, max_len, dtype=dtype)
        self.capacity_factor = capacity_factor
        self.decode_path = decode_path
        self.device = self.cache.device
        self.compiled = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.compiled = CompiledDecode(model, self.cache, backend=backend)

    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    # --- slots -----------------------------------------------------------------------------

    def length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def reset(self, slot: int) -> None:
        self.cache.reset(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll ``slot`` back to its first ``length`` tokens (e.g. rejected draft tokens)."""
        self.cache.truncate(slot, length)

    # --- steps -----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, slots: Sequence[int], tokens: torch.Tensor,
                n_valid: Sequence[int] | None = None) -> torch.Tensor:
        """Append tokens [B, S] to slots (row b to ``slots[b]``); returns logits [B, S, V].

        ``n_valid[b]``: how many of row b's tokens are real (a right-padded ragged batch);
        the slot's length grows by that many, so its padding is overwritten later.
        """
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() != 2 or tokens.shape[0] != len(slots):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} for {len(slots)} slots: "
                             "want [len(slots), S]")
        if self.compiled is not None and tokens.shape[1] == 1 and n_valid is None:
            return self.compiled(slots, tokens)
        view = self.cache.view(slots, tokens.shape[1])
        logits = self.model(tokens, kv_cache=view, capacity_factor=self.capacity_factor,
                            decode_path=self.decode_path)
        self.cache.advance(slots, [tokens.shape[1]] * len(slots) if n_valid is None else n_valid)
        return logits

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], *,
                every_position: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Reset ``slots`` and feed each its prompt; returns logits [B, V] after each prompt,
        or with ``every_position`` a list of [len(prompt), V] (row i predicts token i + 1: what
        prompt log-probabilities, OpenAI's ``echo``, are read from)."""
        slots = list(slots)
        if len(prompts) != len(slots):
            raise ValueError(f"{len(prompts)} prompts for {len(slots)} slots")
        prompts = [self.check_prompt(p) for p in prompts]
        for s in slots:
            self.reset(s)
        if self.capacity_factor is not None and len(prompts) > 1:
            # Padding would compete for capacity: one prompt at a time.
            rows = [self.prefill([s], [p], every_position=every_position)
                    for s, p in zip(slots, prompts)]
            return [r[0] for r in rows] if every_position else torch.cat(rows)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        logits = self.forward(slots, tokens, n_valid=lengths)
        if every_position:
            return [logits[b, :n] for b, n in enumerate(lengths)]
        last = torch.tensor(lengths, device=logits.device) - 1
        return logits[torch.arange(len(prompts), device=logits.device), last]

    def append(self, slots: Sequence[int], rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Append ``rows[b]`` (one or more tokens) to ``slots[b]``, rows of different lengths
        together; returns each row's logits [len(rows[b]), V]. A right-padded forward of width
        S needs room for S tokens in every row's slot, so rows are grouped: the longest rows
        first with every other row that has room for their width (usually one forward)."""
        slots, rows = list(slots), [list(r) for r in rows]
        if len(rows) != len(slots) or any(not r for r in rows):
            raise ValueError(f"{len(rows)} token rows for {len(slots)} slots: want one "
                             "non-empty row per slot")
        out: dict[int, torch.Tensor] = {}
        left = list(range(len(rows)))
        while left:
            width = max(len(rows[b]) for b in left)
            group = [b for b in left if self.length(slots[b]) + width <= self.max_len]
            if not group:  # the widest row itself does not fit: the cache's error
                group = [max(left, key=lambda b: len(rows[b]))]
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            for i, b in enumerate(group):
                tokens[i, :len(rows[b])] = torch.tensor(rows[b])
            n = [len(rows[b]) for b in group]
            logits = self.forward([slots[b] for b in group], tokens, n_valid=n)
            out.update((b, logits[i, :n[i]]) for i, b in enumerate(group))
            left = [b for b in left if b not in out]
        return [out[b] for b in range(len(rows))]

    def decode(self, slots: Sequence[int], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One token per slot; returns logits [B, V]."""
        tokens = torch.as_tensor(tokens, device=self.device).view(-1, 1)
        return self.forward(slots, tokens)[:, -1]

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; ValueError if empty, too long or out of vocabulary."""
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token (e.g. <|endoftext|>, id 0)")
        if len(ids) > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than the context "
                             f"(model.max_seq_len={self.cfg.max_seq_len}, cache "
                             f"max_len={self.max_len})")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:4]} outside [0, "
                             f"model.vocab_size={self.cfg.vocab_size})")
        return ids

    # --- generation ------------------------------------------------------------------------

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams],
               generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
               ) -> Iterator[list[tuple[int, int]]]:
        """Generate for a static batch of prompts (in slots 0 .. B-1); yields, per step, the
        ``(row, token)`` pairs of the rows still generating. A row ends after a stop token or
        ``max_new_tokens``. ``generator``: one shared (rows draw in order), or one per row
        (a row then draws exactly what it draws alone)."""
        n = len(prompts)
        if not 1 <= n <= self.n_slots:
            raise ValueError(f"{n} prompts for an engine of {self.n_slots} slots")
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * n
        if len(params) != n or len(gens) != n:
            raise ValueError(f"{len(params)} sampling params and {len(gens)} generators for "
                             f"{n} prompts")
        seqs = [self.check_prompt(p) for p in prompts]
        active = [r for r in range(n) if params[r].max_new_tokens > 0]
        if not active:
            return
        made = [0] * n
        logits = dict(zip(range(n), self.prefill(list(range(n)), seqs)))
        while active:
            tokens = self._sample(active, {r: suppress_stops(logits[r], params[r], made[r])
                                           for r in active}, params, gens)
            step, going = [], []
            for r, tok in zip(active, tokens):
                seqs[r].append(tok)
                made[r] += 1
                step.append((r, tok))
                if tok not in params[r].stop_tokens and made[r] < params[r].max_new_tokens:
                    going.append(r)
            yield step
            active = going
            if not active:
                return
            logits = {}
            full = [r for r in active if self.length(r) == self.max_len]
            fits = [r for r in active if self.length(r) < self.max_len]
            if fits:
                out = self.decode(fits, [seqs[r][-1] for r in fits])
                logits.update(zip(fits, out))
            for r in full:  # the window slides: re-prefill the last max_len tokens
                logits[r] = self.prefill([r], [seqs[r][-self.max_len:]])[0]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
                 ) -> list[list[int]]:
        """The new tokens of each prompt (a stop token included), as ``stream`` makes them."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params, generator):
            for r, tok in step:
                out[r].append(tok)
        return out

    @staticmethod
    def _sample(rows: list[int], logits: dict[int, torch.Tensor],
                params: list[SamplingParams], gens: list) -> list[int]:
        """Next token of each row: one batched argmax when all rows are greedy."""
        if all(params[r].greedy for r in rows):
            return torch.stack([logits[r] for r in rows]).argmax(-1).tolist()
        return [int(sample(logits[r][None], params[r], gens[r])[0]) for r in rows]
