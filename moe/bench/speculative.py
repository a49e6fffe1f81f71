"""The speculative-decoding section of the decode benchmark (scripts/bench_decode.py).

Models. With ``--target RUN --draft RUN`` (e.g. runs of configs/tiny.yaml and
configs/draft.yaml, which share the tokenizer) those two, on four Python prompts encoded by
the target run's tokenizer. Without runs (CI, a fresh checkout) nothing is trained or read:
the target is the bench model (random weights from ``train.seed``) and the draft a random
one-layer dense model of the same width and vocabulary (the shape of configs/draft.yaml),
on two random prompts. Random models' acceptance says nothing about trained ones: that run
measures the machinery (its overhead, the rates against their predictions), not a useful
speedup. ``speculative.models`` says which ran.

Timing. For each gamma asked for (``draft_tokens``: one, or several to find the best) and
each mode, greedy and sampled (temperature 1, no top-k / top-p: the models' own
distributions), every prompt is continued by ``new_tokens`` tokens (no stop token) by the
target alone (an ``Engine``) and by a ``SpeculativeDecoder``, both reused across calls, taken
in turns ``repeats`` times after an untimed warm-up; the speedup is the ratio of the median
wall times over all prompts. Greedy checks the tokens are the target's own. The rates come
from the decoder's ``SpeculativeStats`` over the timed runs (fresh seeds each call, so the
repeats are independent samples): acceptance measured (accepted / accept tests) beside
1 - TV(p, q) averaged over the same positions, tokens per target call beside
(1 - a^(g + 1)) / (1 - a).

The cost model. ``step_costs`` times one forward of each: the target's decode step t, the
draft's d, the target's verify v(g) of g + 1 tokens for each gamma, and one sampling draw s
(filter, softmax, draw at the vocabulary). ``cost_ratio`` is d / t (Leviathan et al.'s c),
``verify_cost_ratio`` v(g) / t. Per gamma and mode, at the predicted acceptance a:
``speedup_predicted`` is Leviathan et al.'s (1 - a^(g + 1)) / ((1 - a)(g c + 1)), which takes
a verify to cost one step (true of a bandwidth-bound dense model);
``speedup_predicted_measured_verify`` uses the measured v(g) instead; and
``speedup_predicted_cost_model`` (``cost_model_speedup``) adds the sampled mode's draws:
E (t + s) / (g (d + s) + v(g) + s), E the expected tokens per call. ``best_gamma_<mode>`` is
the gamma with the best measured speedup, ``best_gamma_<mode>_predicted`` the cost model's.

In the runs. Timed alone, a short forward's median hides what a loaded machine makes it pay,
so each entry also has ``in_run`` and ``in_run_cpu``: t, d and v(g) as the runs paid them
(``ForwardTimer`` on the engines: wall ms, and this thread's CPU ms, which leaves out the waits
for a core), the rest per plain token and per target call, and the cost model on those
(``speedup_predicted_in_run[_cpu]``) beside ``speedup`` and ``speedup_cpu`` (from the runs'
CPU time); ``best_gamma_<mode>_cpu`` and ``best_gamma_<mode>_predicted_in_run_cpu`` are the
best gammas by those two.
On an MoE target the verify's g + 1 tokens route to up to (g + 1) * top_k distinct experts,
so it reads several times the expert weights of one step: that, and a draft whose per-step
cost is mostly fixed overhead on a CPU, is what decides whether a draft pays.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from moe.bench.forward_timer import ForwardTimer
from moe.inference.engine import Engine
from moe.inference.sampling import SamplingParams, sample
from moe.inference.speculative import SpeculativeDecoder, predicted_tokens_per_call

PROMPTS = ("def ", "import os\nimport sys\n\n\ndef main(", "class Node:\n    def __init__(self, ",
           "    for i in range(len(")


def load_pair(target_run: str, draft_run: str) -> tuple:
    """(target, draft, prompts as token lists) from two runs; ValueError if the tokenizers
    differ or the target run has none."""
    from pathlib import Path

    from moe.checkpoint import load_model
    from moe.data import BPETokenizer

    target, draft = load_model(target_run), load_model(draft_run)
    if target.tokenizer is None:
        raise ValueError(f"no tokenizer.json for {target.checkpoint}")
    if draft.tokenizer is not None and \
            Path(target.tokenizer).read_bytes() != Path(draft.tokenizer).read_bytes():
        raise ValueError(f"the draft's tokenizer {draft.tokenizer} differs from the target's "
                         f"{target.tokenizer}")
    tok = BPETokenizer.load(target.tokenizer)
    return target.model, draft.model, [tok.encode(p) for p in PROMPTS]


def random_pair(target, prompt_len: int, seed: int, n_prompts: int = 2) -> tuple:
    """(target, a random one-layer dense draft of its width and vocabulary, random prompts)."""
    from moe.model import build_model

    m = target.cfg
    dcfg = dataclasses.replace(m, n_layers=1, moe_every=2, ffn_hidden=m.top_k * m.expert_hidden,
                               tie_embeddings=True)
    draft = build_model(dcfg, seed=seed + 1).eval()
    g = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(1, m.vocab_size, (n_prompts, prompt_len), generator=g).tolist()
    return target, draft, prompts


def forward_ms(engine: Engine, prefix: int, s: int, gen: torch.Generator,
               n: int = 40) -> float:
    """Median ms of one forward of ``s`` random tokens after the ``prefix`` tokens the engine's
    slot 0 holds (rolled back after each). Random tokens, new each call: routing as diverse
    as sampled text's (MoE: s tokens route to up to s * top_k distinct experts)."""
    times = []
    for _ in range(n):
        engine.truncate(0, prefix)
        tokens = torch.randint(0, engine.cfg.vocab_size, (1, s), generator=gen)
        t0 = time.perf_counter()
        engine.forward([0], tokens)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_costs(target, draft, prompt: list[int], gammas: Sequence[int], n: int = 40) -> dict:
    """Median ms of one forward after ``prompt``: a decode step of each model, the target's
    verify of gamma + 1 tokens for each gamma (MoE: those tokens route to up to
    (gamma + 1) * top_k distinct experts, so unlike a dense model's the verify reads more
    weights than a step), and one sampling draw (``sample`` at temperature 1 on the target's
    vocabulary: filter, softmax, draw). Taken in turns, one of each per round, so load that
    drifts on a shared machine falls on every ratio alike."""
    g = torch.Generator().manual_seed(0)
    t, d = Engine(target, 1), Engine(draft, 1)
    t.prefill([0], [prompt])
    d.prefill([0], [prompt])
    logits = torch.randn(1, target.cfg.vocab_size, generator=g)
    params = SamplingParams(temperature=1.0)

    def draw() -> float:
        t0 = time.perf_counter()
        sample(logits, params, g)
        return 1e3 * (time.perf_counter() - t0)

    kinds: dict = {"target_step_ms": lambda: forward_ms(t, len(prompt), 1, g, 1),
                   "draft_step_ms": lambda: forward_ms(d, len(prompt), 1, g, 1),
                   "sample_ms": draw}
    for gm in gammas:
        kinds[gm] = lambda gm=gm: forward_ms(t, len(prompt), gm + 1, g, 1)
    times: dict = {k: [] for k in kinds}
    for i in range(n + 2):  # the first two rounds warm up
        for k, fn in kinds.items():
            ms = fn()
            if i >= 2:
                times[k].append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"target_step_ms": med["target_step_ms"], "draft_step_ms": med["draft_step_ms"],
            "sample_ms": med["sample_ms"],
            "target_verify_ms": {gm: med[gm] for gm in gammas}}


def cost_model_speedup(alpha: float, gamma: int, step_ms: float, draft_ms: float,
                       verify_ms: float, sample_ms: float = 0.0) -> float:
    """Predicted speedup of speculative decoding over the target alone, from measured costs.

    A token of the target alone costs a step t plus a sampling draw s; a speculative call
    costs gamma draft steps d, each with a draw, a verify v(gamma) of gamma + 1 tokens, and
    the accept / resample step (about one draw), and yields E = (1 - a^(g + 1)) / (1 - a)
    tokens (Leviathan et al., eq. 1):

        speedup = E (t + s) / (g (d + s) + v(g) + s)

    Greedy: s = 0 (an argmax). With v = t and s = 0 this is Leviathan et al.'s
    (1 - a^(g + 1)) / ((1 - a)(g c + 1)), c = d / t."""
    per_call = predicted_tokens_per_call(alpha, gamma)
    return per_call * (step_ms + sample_ms) / (
        gamma * (draft_ms + sample_ms) + verify_ms + sample_ms)


def speculative_bench(target, draft, prompts: list[list[int]], new_tokens: int,
                      draft_tokens: int | Sequence[int], repeats: int, seed: int = 0,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The section's keys (see the module docstring); ``draft_tokens``: gamma, or several."""
    gammas = [draft_tokens] if isinstance(draft_tokens, int) else list(draft_tokens)
    if not gammas or any(isinstance(gm, bool) or not isinstance(gm, int) or gm < 1
                         for gm in gammas):
        raise ValueError(f"draft tokens {draft_tokens!r}: want integers >= 1")
    room = min(target.cfg.max_seq_len, draft.cfg.max_seq_len) - max(map(len, prompts))
    new_tokens = min(new_tokens, room - max(gammas) - 1)  # room left for step_costs' verify
    if new_tokens < 1:
        raise ValueError(f"prompts of up to {max(map(len, prompts))} tokens leave no room in "
                         f"max_seq_len={target.cfg.max_seq_len}")
    total = new_tokens * len(prompts)
    plain = Engine(target, 1)
    plain_timer = ForwardTimer(plain)
    modes = {"greedy": SamplingParams(max_new_tokens=new_tokens, temperature=0),
             "sampled": SamplingParams(max_new_tokens=new_tokens, temperature=1.0)}
    out: dict = {"draft_tokens": gammas, "new_tokens": new_tokens,
                 "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                 "runs": repeats}
    with torch.no_grad():
        costs = step_costs(target, draft, prompts[0], gammas)
    verify_ms = costs.pop("target_verify_ms")
    out.update(costs)
    t_ms, d_ms, s_ms = out["target_step_ms"], out["draft_step_ms"], out["sample_ms"]
    out["cost_ratio"] = d_ms / t_ms  # Leviathan et al.'s c
    out["by_gamma"] = {}
    for g in gammas:
        row: dict = {"target_verify_ms": verify_ms[g], "verify_cost_ratio": verify_ms[g] / t_ms}
        for mode, params in modes.items():
            log(f"  gamma {g}, {mode}")
            entry = _time_mode(plain, plain_timer, SpeculativeDecoder(target, draft, g),
                               prompts, params, repeats, seed, total, log)
            a = entry["acceptance_rate_predicted"]
            entry["speedup_predicted"] = cost_model_speedup(a, g, 1.0, out["cost_ratio"], 1.0)
            entry["speedup_predicted_measured_verify"] = cost_model_speedup(a, g, t_ms, d_ms,
                                                                            verify_ms[g])
            draw = 0.0 if params.greedy else s_ms
            entry["speedup_predicted_cost_model"] = cost_model_speedup(
                a, g, t_ms, d_ms, verify_ms[g], draw)
            for key in ("in_run", "in_run_cpu"):  # the same model on the costs the runs paid
                ir = entry[key]
                entry[f"speedup_predicted_{key}"] = cost_model_speedup(
                    a, g, ir["target_step_ms"], ir["draft_step_ms"], ir["verify_ms"], draw)
            row[mode] = entry
        out["by_gamma"][g] = row
    for mode in modes:
        by = {g: out["by_gamma"][g][mode] for g in gammas}
        out[f"best_gamma_{mode}"] = max(gammas, key=lambda g: by[g]["speedup"])
        out[f"best_gamma_{mode}_predicted"] = max(
            gammas, key=lambda g: by[g]["speedup_predicted_cost_model"])
        out[f"best_gamma_{mode}_cpu"] = max(gammas, key=lambda g: by[g]["speedup_cpu"])
        out[f"best_gamma_{mode}_predicted_in_run_cpu"] = max(
            gammas, key=lambda g: by[g]["speedup_predicted_in_run_cpu"])
    return out


def _time_mode(plain: Engine, plain_timer: ForwardTimer, dec: SpeculativeDecoder,
               prompts: list[list[int]], params: SamplingParams, repeats: int, seed: int,
               total: int, log: Callable[[str], None]) -> dict:
    """One mode at one gamma: the target alone and the decoder in turns, after a warm-up;
    medians, rates over the timed runs, and ``in_run``: the step costs as the runs paid them
    (``ForwardTimer``: the target's decode step, the draft's forward, the verify of
    gamma + 1 tokens) and the rest of the wall time, per plain token and per target call
    (sampling, filters, cache bookkeeping, Python)."""
    runs = _runs(plain, dec, prompts, params, seed)
    timers = {"plain": plain_timer, "verify": ForwardTimer(dec.target),
              "draft": ForwardTimer(dec.proposer.engine)}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        dec.stats.reset()
        for tm in timers.values():
            tm.reset()
        walls: dict[str, list[float]] = {k: [] for k in runs}
        cpus: dict[str, list[float]] = {k: [] for k in runs}
        tokens = {}
        for i in range(repeats):
            for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
                t0, c0 = time.perf_counter(), time.thread_time()
                tokens[name] = runs[name]()
                walls[name].append(time.perf_counter() - t0)
                cpus[name].append(time.thread_time() - c0)
                log(f"    run {i + 1}/{repeats} {name:11s} "
                    f"{total / walls[name][-1]:7.1f} tokens/s")
    med = {k: statistics.median(v) for k, v in walls.items()}
    entry = {"speedup": med["target"] / med["speculative"],
             # The same from this thread's CPU time: what the runs cost without the waits
             # for a core that a shared machine adds (one torch thread).
             "speedup_cpu": statistics.median(cpus["target"])
             / statistics.median(cpus["speculative"]),
             "target_tokens_per_s": total / med["target"],
             "speculative_tokens_per_s": total / med["speculative"],
             **dec.stats.to_dict(),
             "wall_s_target": walls["target"], "wall_s_speculative": walls["speculative"],
             "cpu_s_target": cpus["target"], "cpu_s_speculative": cpus["speculative"]}
    if params.greedy:
        entry["same_tokens"] = tokens["speculative"] == tokens["target"]
    g, calls = dec.draft_tokens, max(dec.stats.target_calls, 1)
    for key, cpu, spent in (("in_run", False, walls), ("in_run_cpu", True, cpus)):
        entry[key] = {
            "target_step_ms": timers["plain"].mean_ms(1, cpu),
            "draft_step_ms": timers["draft"].mean_ms(None, cpu),
            "verify_ms": timers["verify"].mean_ms(g + 1, cpu),
            "other_ms_per_plain_token": (1e3 * sum(spent["target"])
                                         - timers["plain"].total_ms(cpu)) / (total * repeats),
            "other_ms_per_call": (1e3 * sum(spent["speculative"])
                                  - timers["verify"].total_ms(cpu)
                                  - timers["draft"].total_ms(cpu)) / calls}
    return entry


def _runs(plain: Engine, dec: SpeculativeDecoder, prompts: list[list[int]],
          params: SamplingParams, seed: int) -> dict[str, Callable[[], list[list[int]]]]:
    """The timed calls: every prompt continued by the target alone and with the draft. Each
    call draws from fresh generators with new seeds, so repeats add independent samples to
    the acceptance statistics."""
    seeds = itertools.count(seed * 1_000_003)

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(next(seeds)) for _ in prompts]

    return {"target": lambda: [plain.generate([p], params, g)[0]
                               for p, g in zip(prompts, gens())],
            "speculative": lambda: [dec.generate(p, params, g) for p, g in zip(prompts, gens())]}


def speculative_keys(section: dict) -> dict:
    """The top-level keys of the benchmark's JSON: those of the gamma with the best measured
    sampled speedup, in the sampled mode (where 1 - TV(p, q) is not trivially the measured
    rate, as it is under greedy), and the best greedy speedup."""
    best = section["by_gamma"][section["best_gamma_sampled"]]
    s = best["sampled"]
    greedy = section["by_gamma"][section["best_gamma_greedy"]]["greedy"]
    return {"speculative_speedup": s["speedup"],
            "speculative_speedup_predicted": s["speedup_predicted_cost_model"],
            "speculative_draft_tokens": section["best_gamma_sampled"],
            "acceptance_rate": s["acceptance_rate"],
            "acceptance_rate_predicted": s["acceptance_rate_predicted"],
            "tokens_per_target_call": s["tokens_per_target_call"],
            "tokens_per_target_call_predicted": s["tokens_per_target_call_predicted"],
            "speculative_speedup_greedy": greedy["speedup"],
            "speculative_draft_tokens_greedy": section["best_gamma_greedy"],
            "speculative": section}
