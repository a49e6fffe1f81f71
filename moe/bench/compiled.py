"""The compiled-decode section of the decode benchmark (scripts/bench_decode.py --compile).

Greedy decode at batch 1 of one prompt by an ``Engine`` with eager steps and one whose decode
steps are compiled (``Engine(compile=True)``, moe/inference/compiled.py), on the same model.
``compile_s`` is the compiled engine's first ``generate`` (tracing, inductor's code
generation and the C++ build of its kernels, which an on-disk cache shortens on later
processes), ``eager_first_s`` the eager engine's for comparison. Then ``repeats`` timed
runs of each, in turns; medians. ``same_tokens`` compares the two outputs;
``max_abs_logit_diff`` the logits of the two engines' decode steps over those tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from moe.inference.engine import Engine
from moe.inference.sampling import SamplingParams


def compiled_speed(model, prompt: list[int], new_tokens: int, repeats: int,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """The section's keys (see the module docstring)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    engines = {"eager": Engine(model, 1), "compiled": Engine(model, 1, compile=True)}
    out: dict = {"new_tokens": new_tokens, "prompt_tokens": len(prompt), "runs": repeats}
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, eng in engines.items():
            t0 = time.perf_counter()
            tokens[name] = eng.generate([prompt], params)[0]
            out["compile_s" if name == "compiled" else "eager_first_s"] = \
                time.perf_counter() - t0
        log(f"  first call: eager {out['eager_first_s']:.1f} s, compiled {out['compile_s']:.1f} s")
        walls: dict[str, list[float]] = {k: [] for k in engines}
        for i in range(repeats):
            for name in list(engines) if i % 2 == 0 else list(reversed(engines)):
                t0 = time.perf_counter()
                engines[name].generate([prompt], params)
                walls[name].append(time.perf_counter() - t0)
                log(f"  run {i + 1}/{repeats} {name:8s} "
                    f"{new_tokens / walls[name][-1]:7.1f} tokens/s")
        diff = 0.0
        for name in engines:
            engines[name].prefill([0], [prompt])
        for tok in tokens["eager"][:-1]:
            a, b = (engines[n].decode([0], [tok]) for n in engines)
            diff = max(diff, float((a - b).abs().max()))
    for name in engines:
        out[f"{name}_tokens_per_s"] = new_tokens / statistics.median(walls[name])
        out[f"wall_s_{name}"] = walls[name]
    out["compiled_over_eager"] = out["compiled_tokens_per_s"] / out["eager_tokens_per_s"]
    out["same_tokens"] = tokens["eager"] == tokens["compiled"]
    out["max_abs_logit_diff"] = diff
    return out
