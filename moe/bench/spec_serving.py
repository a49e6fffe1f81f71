"""Prompt lookup inside continuous batching: scripts/bench_decode.py --prompt-lookup N
--target RUN --scheduler-slots 1,4.

The code-completion workload of moe/bench/prompt_lookup.py (prompts cut from the validation
split's Python files, each continued greedily by ``new_tokens`` tokens, no stop token), run
through the continuous-batching ``Scheduler`` the server drives, plain and with every request
speculating by prompt lookup (moe/inference/spec_batch.py), for each number of slots: 1 (one
request at a time, the queue holding the rest) and e.g. 4 (4 requests decoded together, each
step one target forward over all of them: plain rows of one token, or verifies of up to
N + 1). Both ways run in turns (the order reversed every other round), ``repeats`` times after
an untimed warm-up; tokens/s = new tokens / median wall time. ``same_tokens``: prompt lookup
gave plain's tokens. ``steps``: scheduler steps (target forwards, prefills included) of one
round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from moe.inference.engine import Engine
from moe.inference.sampling import SamplingParams
from moe.inference.scheduler import Request, Scheduler
from moe.inference.spec_batch import Speculation


def scheduler_prompt_lookup_bench(model, prompts: list[list[int]], new_tokens: int,
                                  draft_tokens: int, slots: list[int], repeats: int,
                                  max_ngram: int = 3,
                                  log: Callable[[str], None] | None = None) -> dict:
    """{"slots_<n>": {"plain": {...}, "prompt_lookup": {...}, "speedup", "same_tokens"}}."""
    log = log or (lambda s: None)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    spec = Speculation("ngram", draft_tokens, max_ngram=max_ngram)
    total = new_tokens * len(prompts)
    out: dict = {"draft_tokens": draft_tokens, "max_ngram": max_ngram, "runs": repeats,
                 "prompts": len(prompts), "new_tokens": new_tokens}
    for n in slots:
        def run(speculative: Speculation | None, n: int = n) -> tuple[list, Scheduler, int]:
            sched = Scheduler(Engine(model, n))
            for p in prompts:
                sched.submit(Request(p, params, speculative=speculative))
            steps = 0
            while sched.has_work:
                sched.step()
                steps += 1
            return [r.tokens for r in sched.admitted], sched, steps

        ways = {"plain": None, "prompt_lookup": spec}
        walls: dict[str, list[float]] = {k: [] for k in ways}
        result: dict[str, tuple] = {}
        with torch.no_grad():
            for s in ways.values():
                run(s)  # warm-up
            for i in range(repeats):
                for name in list(ways) if i % 2 == 0 else list(reversed(ways)):
                    t0 = time.perf_counter()
                    result[name] = run(ways[name])
                    walls[name].append(time.perf_counter() - t0)
                    log(f"  {n} slots, run {i + 1}/{repeats} {name:14s} "
                        f"{total / walls[name][-1]:7.1f} tokens/s")
        section: dict = {}
        for name, w in walls.items():
            section[name] = {"tokens_per_s": total / statistics.median(w), "wall_s": w,
                             "steps": result[name][2]}
        st = result["prompt_lookup"][1].spec_stats
        section["prompt_lookup"].update(acceptance_rate=st.acceptance_rate,
                                        tokens_per_verify=st.tokens_per_target_call,
                                        verifies=st.target_calls, plain_rows=st.plain_calls)
        section["speedup"] = (section["prompt_lookup"]["tokens_per_s"]
                              / section["plain"]["tokens_per_s"])
        section["same_tokens"] = result["prompt_lookup"][0] == result["plain"][0]
        out[f"slots_{n}"] = section
    return out
