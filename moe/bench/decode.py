"""The decode benchmark behind scripts/bench_decode.py: our engine against Hugging Face.

On the bench shape (configs/bench.yaml, routing forced dropless; weights from ``train.seed``,
tokens uniform random, also seeded), in one run:

- **Decode speed at batch 1**: ``moe.inference.generate.generate`` (KV cache, few-token MoE
  path) against ``MixtralForCausalLM.generate()`` on the same weights
  (``moe.hf.export.to_mixtral_model``), both greedy from the same prompt for ``new_tokens``
  tokens; tokens/s = new tokens / wall time of the whole call (prefill included, cache
  allocation included, for both). The calls are taken in turns, ``repeats`` of each (after one
  untimed warm-up each), and the medians reported, so load that drifts on a shared machine falls
  on both alike; ``*_best`` are the fastest runs, ``speedup_over_hf_paired`` the median over
  turns of HF time / our time (the estimate least disturbed by load spikes), ``*_cpu`` from
  process CPU time. ``same_tokens`` checks the two token lists are equal.
  ``tokens_per_s_reference`` is our engine with the MoE layers' sorted reference path.
- **KV-cache bytes per token**, measured from the allocated buffers of a ``KVCache``: the bench
  model (multi-query attention, one KV head) and the same model with n_kv_heads = n_heads.
- **MoE decode statistics**: tokens per expert per decode step at batch 1, 8 and 64 (each
  layer, each step, counted from the experts the router chose): at small batch most experts
  get 0 or 1 token, which is why MoE decode is bound by reading expert weights.
- **Continuous vs static batching** (``continuous_over_static``): generated tokens/s of the
  continuous-batching ``Scheduler`` over static batches of the same slots
  (``static_batches``: each batch runs until its longest request is done, a finished row
  leaving the decode batch), on one workload of mixed prompt and output lengths, greedy;
  ``continuous_over_static_padded`` is against static batches whose finished rows go on
  decoding, as Hugging Face ``generate()`` does. Timed in turns like the decode speed,
  medians reported, with the token-producing steps each needed (those do not depend on the
  machine's load) and a check that all three made the same tokens.

- **Serving dtypes** (``fp32_tokens_per_s``, ``bf16_tokens_per_s``, ``int8_tokens_per_s``,
  ``*_weight_bytes``, ``*_over_fp32``): decode at batch 1 with the weights cast for serving,
  timed in turns as above (moe/bench/dtypes.py).

- **Speculative decoding** (``speculative_speedup``, ``acceptance_rate`` measured and
  ``acceptance_rate_predicted``, tokens per target call measured and predicted): the
  trained ``target_run`` / ``draft_run`` if given, else random models (nothing is trained);
  moe/bench/speculative.py says what and how.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

from moe.bench.dtypes import dtype_speed
from moe.bench.speculative import (
    load_pair,
    random_pair,
    speculative_bench,
    speculative_keys,
)
from moe.config import Config, load_config
from moe.device import set_threads
from moe.inference import Engine, KVCache, Request, SamplingParams, Scheduler, static_batches
from moe.inference.weights import SERVING_DTYPES
from moe.model import build_model


def bench_config(path: str = "configs/bench.yaml", overrides: list[str] | None = None) -> Config:
    """The bench config with dropless routing (both capacity factors null) before overrides."""
    return load_config(path, ["--model.capacity_factor=null",
                              "--model.eval_capacity_factor=null", *(overrides or [])])


def _timed(fn: Callable[[], list[int]]) -> tuple[list[int], float, float]:
    """(result, wall s, process CPU s) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def decode_speed(model, prompt: list[int], new_tokens: int, repeats: int, hf_model=None,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Greedy decode tokens/s at batch 1: ours (fast and reference MoE paths) and HF's."""
    from moe.inference.generate import generate

    ids = torch.tensor([prompt])
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def ours() -> list[int]:
        out = generate(model, ids, max_new_tokens=new_tokens, temperature=0)
        return out[0, len(prompt):].tolist()

    def reference() -> list[int]:
        return Engine(model, 1, decode_path=False).generate([prompt], params)[0]

    def hf() -> list[int]:
        out = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    runs = {"ours": ours, "reference": reference}
    if hf_model is not None:
        runs["hf"] = hf
    with torch.no_grad():
        for fn in runs.values():  # warm-up: first-call costs (allocator, lazy init)
            fn()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        tokens: dict[str, list[int]] = {}
        for i in range(repeats):
            order = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in order:
                tokens[name], wall, cpu = _timed(runs[name])
                times[name].append((wall, cpu))
                log(f"  run {i + 1}/{repeats} {name:9s} {new_tokens / wall:7.1f} tokens/s")

    def rate(name: str) -> float:
        return new_tokens / statistics.median(w for w, _ in times[name])

    def cpu_rate(name: str) -> float:
        return new_tokens / statistics.median(c for _, c in times[name])

    out = {"tokens_per_s": rate("ours"), "tokens_per_s_cpu": cpu_rate("ours"),
           "tokens_per_s_reference": rate("reference"),
           "reference_same_tokens": tokens["reference"] == tokens["ours"],
           "runs": repeats, "new_tokens": new_tokens, "prompt_tokens": len(prompt),
           "wall_s_ours": [w for w, _ in times["ours"]]}
    out["tokens_per_s_best"] = new_tokens / min(w for w, _ in times["ours"])
    if hf_model is not None:
        mine, theirs = tokens["ours"], tokens["hf"]
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        paired = statistics.median(h / o for (o, _), (h, _) in zip(times["ours"], times["hf"]))
        out.update(hf_tokens_per_s=rate("hf"), hf_tokens_per_s_cpu=cpu_rate("hf"),
                   hf_tokens_per_s_best=new_tokens / min(w for w, _ in times["hf"]),
                   speedup_over_hf=rate("ours") / rate("hf"),
                   speedup_over_hf_cpu=cpu_rate("ours") / cpu_rate("hf"),
                   speedup_over_hf_paired=paired,
                   same_tokens=mine == theirs, first_mismatch=first,
                   wall_s_hf=[w for w, _ in times["hf"]])
    return out


def kv_cache_bytes(cfg: Config) -> dict:
    """Bytes per token of allocated caches: the config's attention and multi-head attention."""
    mha = dataclasses.replace(cfg.model, n_kv_heads=cfg.model.n_heads)
    out = {}
    for key, mcfg in (("kv_cache_bytes_per_token", cfg.model),
                      ("kv_cache_bytes_per_token_mha", mha)):
        skeleton = build_model(mcfg, device="meta")  # shapes only; the cache is real
        out[key] = KVCache(skeleton, n_slots=1, dtype=torch.float32, device="cpu").bytes_per_token()
    out["kv_cache_mha_over_mqa"] = (out["kv_cache_bytes_per_token_mha"]
                                    / out["kv_cache_bytes_per_token"])
    return out


def moe_decode_stats(model, batches: tuple[int, ...], prompt_len: int, steps: int,
                     seed: int) -> dict:
    """Tokens per expert per decode step (every MoE layer, every step) at each batch size."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    out = {}
    for batch in batches:
        engine = Engine(model, n_slots=batch, max_len=min(cfg.max_seq_len, prompt_len + steps))
        prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
        logits = engine.prefill(range(batch), prompts)
        counts = []  # [E] per (step, layer)
        for _ in range(steps):
            logits = engine.decode(range(batch), logits.argmax(-1))
            for m in model.moe_layers():
                counts.append(torch.bincount(m.last_experts.reshape(-1), minlength=m.n_experts))
        c = torch.stack(counts).float()  # [steps * layers, E]
        hist = torch.bincount(c.long().reshape(-1), minlength=3).float() / c.numel()
        out[f"batch_{batch}"] = {
            "tokens_per_expert_mean": float(c.mean()),
            "tokens_per_expert_max_mean": float(c.max(1).values.mean()),
            "experts_used_mean": float((c > 0).sum(1).float().mean()),
            "frac_experts_0_tokens": float(hist[0]),
            "frac_experts_1_token": float(hist[1]),
            "frac_experts_0_or_1": float(hist[0] + hist[1]),
            "steps": steps,
        }
    return out


def batching_workload(vocab_size: int, n_requests: int, prompt_len: int, new_tokens: int,
                      seed: int) -> list[tuple[list[int], int]]:
    """(prompt, output length) pairs: prompts of prompt_len // 2 .. prompt_len random tokens,
    output lengths uniform in new_tokens // 16 .. new_tokens // 2 (mixed, as served traffic)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: int, hi: int) -> int:
        return int(torch.randint(max(1, lo), max(1, hi) + 1, (1,), generator=g))

    work = []
    for _ in range(n_requests):
        n_prompt = uniform(prompt_len // 2, prompt_len)
        prompt = torch.randint(1, vocab_size, (n_prompt,), generator=g).tolist()
        work.append((prompt, uniform(new_tokens // 16, new_tokens // 2)))
    return work


def batching_throughput(model, n_slots: int, n_requests: int, prompt_len: int, new_tokens: int,
                        repeats: int, seed: int,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Generated tokens/s: continuous batching (``Scheduler``) vs static batches of
    ``n_slots`` (each runs until its longest request is done), same engine, same workload."""
    work = batching_workload(model.cfg.vocab_size, n_requests, prompt_len, new_tokens, seed)
    total = sum(n for _, n in work)
    engine = Engine(model, n_slots=n_slots)

    def requests(limit: int | None = None) -> list[Request]:
        return [Request(p, SamplingParams(max_new_tokens=min(n, limit or n), temperature=0))
                for p, n in work]

    def continuous(reqs: list[Request]) -> tuple[list[list[int]], int]:
        sched, steps = Scheduler(engine), 0
        reqs = [sched.submit(r) for r in reqs]
        while sched.has_work:
            sched.step()
            steps += 1
        return [r.tokens for r in reqs], steps

    def static(reqs: list[Request]) -> tuple[list[list[int]], int]:
        steps = sum(max(r.params.max_new_tokens for r in reqs[i:i + n_slots])
                    for i in range(0, len(reqs), n_slots))
        return static_batches(engine, reqs), steps

    def padded(reqs: list[Request]) -> tuple[list[list[int]], int]:
        """Static batches whose finished rows go on decoding (discarded) until the longest is
        done, as Hugging Face ``generate()`` pads: every step costs a full batch."""
        out, steps = [], 0
        for i in range(0, len(reqs), n_slots):
            batch = reqs[i:i + n_slots]
            slots, longest = list(range(len(batch))), max(r.params.max_new_tokens for r in batch)
            rows = [[t] for t in engine.prefill(slots, [r.prompt for r in batch]).argmax(-1)
                    .tolist()]
            for _ in range(longest - 1):
                nxt = engine.decode(slots, [row[-1] for row in rows]).argmax(-1).tolist()
                for row, t in zip(rows, nxt):
                    row.append(t)
            steps += longest
            out += [row[:r.params.max_new_tokens] for row, r in zip(rows, batch)]
        return out, steps

    runs = {"continuous": continuous, "static": static, "static_padded": padded}
    for fn in runs.values():  # warm-up: every prompt once, two tokens each
        fn(requests(limit=2))
    walls: dict[str, list[float]] = {k: [] for k in runs}
    out: dict[str, tuple[list[list[int]], int]] = {}
    for i in range(repeats):
        for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
            t0 = time.perf_counter()
            out[name] = runs[name](requests())
            walls[name].append(time.perf_counter() - t0)
            log(f"  run {i + 1}/{repeats} {name:13s} {total / walls[name][-1]:7.1f} tokens/s, "
                f"{out[name][1]} steps")
    rate = {k: total / statistics.median(v) for k, v in walls.items()}
    lengths = [n for _, n in work]
    return {"continuous_over_static": rate["continuous"] / rate["static"],
            "continuous_over_static_padded": rate["continuous"] / rate["static_padded"],
            "continuous_tokens_per_s": rate["continuous"],
            "static_tokens_per_s": rate["static"],
            "static_padded_tokens_per_s": rate["static_padded"],
            "batching": {"slots": n_slots, "requests": n_requests, "generated_tokens": total,
                         "output_tokens_min_max": [min(lengths), max(lengths)],
                         "steps_continuous": out["continuous"][1],
                         "steps_static": out["static"][1],
                         "same_tokens": (out["continuous"][0] == out["static"][0]
                                         == out["static_padded"][0]),
                         "runs": repeats, "wall_s_continuous": walls["continuous"],
                         "wall_s_static": walls["static"],
                         "wall_s_static_padded": walls["static_padded"]}}


def run_decode_bench(cfg: Config, prompt_len: int = 32, new_tokens: int = 224,
                     repeats: int = 3, batches: tuple[int, ...] = (1, 8, 64),
                     stat_steps: int = 16, hf: bool = True, batch_slots: int = 8,
                     batch_requests: int = 24, target_run: str | None = None,
                     draft_run: str | None = None,
                     draft_tokens: int | tuple[int, ...] = 4,
                     spec_new_tokens: int = 64, speculative: bool = True,
                     dtypes: tuple[str, ...] = SERVING_DTYPES,
                     log: Callable[[str], None] | None = None) -> dict:
    """Every section of the decode benchmark, as one dict (scripts/bench_decode.py --json).
    ``dtypes``: the serving dtypes timed against fp32 (empty: the section is skipped)."""
    log = log or (lambda s: None)
    threads = set_threads(cfg.train.threads)
    m = cfg.model
    if prompt_len + new_tokens > m.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + {new_tokens} new tokens exceed "
                         f"model.max_seq_len={m.max_seq_len}")
    model = build_model(m, seed=cfg.train.seed).eval()
    if speculative:  # the runs are read first: a bad one fails before the timing starts
        if (target_run is None) != (draft_run is None):
            raise ValueError("give both --target and --draft runs, or neither (random models)")
        if target_run is not None:
            pair, models = load_pair(target_run, draft_run), "runs"
        else:
            pair, models = random_pair(model, prompt_len, cfg.train.seed), "random"
    g = torch.Generator().manual_seed(cfg.train.seed)
    prompt = torch.randint(1, m.vocab_size, (prompt_len,), generator=g).tolist()
    result: dict = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg(),
                    "config": {"vocab_size": m.vocab_size, "d_model": m.d_model,
                               "n_layers": m.n_layers, "n_heads": m.n_heads,
                               "n_kv_heads": m.n_kv_heads, "n_experts": m.n_experts,
                               "top_k": m.top_k, "expert_hidden": m.expert_hidden,
                               "capacity_factor": m.capacity_factor}}
    hf_model = None
    if hf:
        from moe.hf.export import to_mixtral_model

        hf_model = to_mixtral_model(model)
        hf_model.generation_config.eos_token_id = None  # run the full length, as ours
    log(f"decode at batch 1: prompt {prompt_len}, {new_tokens} new tokens, {repeats} runs each, "
        f"{threads} threads")
    result.update(decode_speed(model, prompt, new_tokens, repeats, hf_model, log))
    if dtypes:
        log(f"serving dtypes at batch 1: {', '.join(dtypes)}")
        result.update(dtype_speed(model, prompt, new_tokens, repeats, tuple(dtypes), log))
    result.update(kv_cache_bytes(cfg))
    log("MoE decode statistics")
    result["moe_decode"] = moe_decode_stats(model, batches, prompt_len, stat_steps,
                                            cfg.train.seed)
    log(f"continuous vs static batching: {batch_requests} requests, {batch_slots} slots")
    result.update(batching_throughput(model, batch_slots, batch_requests, prompt_len,
                                      new_tokens, repeats, cfg.train.seed, log))
    if speculative:
        log(f"speculative decoding ({models} models), {draft_tokens} draft tokens")
        section = speculative_bench(*pair, spec_new_tokens, draft_tokens, repeats,
                                    cfg.train.seed, log)
        section.update(models=models, target=target_run, draft=draft_run)
        result.update(speculative_keys(section))
    result["loadavg_end"] = _loadavg()
    return result


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        "unknown CPU")
    except OSError:
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}"
