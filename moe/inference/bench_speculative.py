"""The speculative-decoding section of the decode benchmark (scripts/bench_decode.py).

Models. With ``--target RUN --draft RUN`` (e.g. runs of configs/tiny.yaml and
configs/draft.yaml, which share the tokenizer) those two, on four Python prompts encoded by
the target run's tokenizer. Without runs (CI, a fresh checkout) nothing is trained or read:
the target is the bench model (random weights from ``train.seed``) and the draft a random
one-layer dense model of the same width and vocabulary (the shape of configs/draft.yaml),
on two random prompts. Random models' acceptance says nothing about trained ones: that run
measures the machinery (its overhead, the rates against their predictions), not a useful
speedup. ``speculative.models`` says which ran.

Timing. For each mode, greedy and sampled (temperature 1, no top-k / top-p: the models' own
distributions), every prompt is continued by ``new_tokens`` tokens (no stop token) by the
target alone (an ``Engine``) and by a ``SpeculativeDecoder``, both reused across calls, taken
in turns ``repeats`` times after an untimed warm-up; the speedup is the ratio of the median
wall times over all prompts. Greedy checks the tokens are the target's own. The rates come
from the decoder's ``SpeculativeStats`` over the timed runs: acceptance measured (accepted /
accept tests) beside 1 - TV(p, q) averaged over the same positions, tokens per target call
beside (1 - a^(g + 1)) / (1 - a). ``cost_ratio`` c is the draft's time per token over the
target's (each decoding alone, greedy); ``speedup_predicted`` is Leviathan et al.'s
(1 - a^(g + 1)) / ((1 - a)(g c + 1)), which takes a verify of g + 1 tokens to cost one decode
step: on a CPU it costs more, which is most of the gap to the measured speedup.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from moe.inference.engine import Engine
from moe.inference.sampling import SamplingParams
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


def speculative_bench(target, draft, prompts: list[list[int]], new_tokens: int,
                      draft_tokens: int, repeats: int, seed: int = 0,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    """The section's keys (see the module docstring)."""
    room = min(target.cfg.max_seq_len, draft.cfg.max_seq_len) - max(map(len, prompts))
    new_tokens = min(new_tokens, room)
    if new_tokens < 1:
        raise ValueError(f"prompts of up to {max(map(len, prompts))} tokens leave no room in "
                         f"max_seq_len={target.cfg.max_seq_len}")
    total = new_tokens * len(prompts)
    alone = {"target": Engine(target, 1), "draft": Engine(draft, 1)}
    modes = {"greedy": SamplingParams(max_new_tokens=new_tokens, temperature=0),
             "sampled": SamplingParams(max_new_tokens=new_tokens, temperature=1.0)}
    out: dict = {"draft_tokens": draft_tokens, "new_tokens": new_tokens,
                 "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                 "runs": repeats}
    for mode, params in modes.items():
        dec = SpeculativeDecoder(target, draft, draft_tokens)

        runs = _runs(alone, dec, prompts, params, seed)
        if mode != "greedy":
            del runs["draft"]  # the draft alone times the cost ratio c, once
        with torch.no_grad():
            for fn in runs.values():
                fn()  # warm-up
            dec.stats.reset()
            walls = {k: [] for k in runs}
            tokens = {}
            for i in range(repeats):
                for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
                    t0 = time.perf_counter()
                    tokens[name] = runs[name]()
                    walls[name].append(time.perf_counter() - t0)
                    log(f"  {mode} run {i + 1}/{repeats} {name:11s} "
                        f"{total / walls[name][-1]:7.1f} tokens/s")
        med = {k: statistics.median(v) for k, v in walls.items()}
        entry = {"speedup": med["target"] / med["speculative"],
                 "target_tokens_per_s": total / med["target"],
                 "speculative_tokens_per_s": total / med["speculative"],
                 **dec.stats.to_dict(),
                 "wall_s_target": walls["target"], "wall_s_speculative": walls["speculative"]}
        if mode == "greedy":
            entry["same_tokens"] = tokens["speculative"] == tokens["target"]
            out["cost_ratio"] = med["draft"] / med["target"]
            out["draft_tokens_per_s"] = total / med["draft"]
        out[mode] = entry
    for entry in (out["greedy"], out["sampled"]):
        a, g, c = entry["acceptance_rate_predicted"], draft_tokens, out["cost_ratio"]
        entry["speedup_predicted"] = predicted_tokens_per_call(a, g) / (g * c + 1)
    return out


def _runs(alone: dict[str, Engine], dec: SpeculativeDecoder, prompts: list[list[int]],
          params: SamplingParams, seed: int) -> dict[str, Callable[[], list[list[int]]]]:
    """The timed calls: every prompt continued by the target alone, with the draft, and by
    the draft alone; the seeded generators are made afresh for each call."""
    def gens():
        return [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]

    return {"target": lambda: [alone["target"].generate([p], params, g)[0]
                               for p, g in zip(prompts, gens())],
            "speculative": lambda: [dec.generate(p, params, g) for p, g in zip(prompts, gens())],
            "draft": lambda: [alone["draft"].generate([p], params, g)[0]
                              for p, g in zip(prompts, gens())]}


def speculative_keys(section: dict) -> dict:
    """The top-level keys of the benchmark's JSON: the sampled mode's (where 1 - TV(p, q) is
    not trivially the measured rate, as it is under greedy), and the greedy speedup."""
    s = section["sampled"]
    return {"speculative_speedup": s["speedup"], "acceptance_rate": s["acceptance_rate"],
            "acceptance_rate_predicted": s["acceptance_rate_predicted"],
            "tokens_per_target_call": s["tokens_per_target_call"],
            "tokens_per_target_call_predicted": s["tokens_per_target_call_predicted"],
            "speculative_speedup_greedy": section["greedy"]["speedup"],
            "speculative": section}
