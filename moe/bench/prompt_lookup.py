"""Prompt lookup on code completion: scripts/bench_decode.py --prompt-lookup N --target RUN.

The workload: prompts cut from the Python files of the built-in corpus's validation split
(the run's own hash split, so the model never trained on them), each continued greedily by
``new_tokens`` tokens. A prompt is the ``prompt_tokens`` tokens before the first line break
after the middle of a file: mid-function code, whose names and idioms the continuation reuses.

Four ways, in one run, on the same weights: plain greedy decoding (our ``Engine``), our prompt
lookup (``SpeculativeDecoder`` with ``NgramProposer``), and Hugging Face's
``MixtralForCausalLM.generate()`` on the exported weights (``moe.hf.export.to_mixtral_model``)
plain and with ``prompt_lookup_num_tokens`` (its ``max_matching_ngram_size`` set to our
``max_ngram``). Each is timed over all prompts, in turns (the order reversed every other
round), ``repeats`` times after an untimed warm-up; tokens/s = new tokens / median wall time.
Greedy must give the same tokens every way (``same_tokens``: our prompt lookup vs plain;
``hf_same_tokens``: Hugging Face plain vs ours; ``hf_prompt_lookup_same_tokens``: theirs vs
their plain). Rates: the decoder's ``SpeculativeStats`` over the timed runs (acceptance =
accepted / accept tests, tokens per verify), and for both prompt lookups
``tokens_per_forward``, new tokens over target forwards (a step that found no match is one
plain forward; Hugging Face's forwards are counted by a hook). ``verify_cost_ratio``: our
target's forward of gamma + 1 random tokens over its decode step, after the first prompt
(``moe.bench.speculative.forward_ms``): its tokens route to up to (gamma + 1) * top_k
experts, so a verify costs several steps on a CPU, and the speedup is about
``tokens_per_forward`` over the mean forward's cost in steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from moe.bench.speculative import forward_ms
from moe.inference.engine import Engine
from moe.inference.ngram import NgramProposer
from moe.inference.sampling import SamplingParams
from moe.inference.speculative import SpeculativeDecoder


def code_prompts(tokenizer, data_cfg, n_prompts: int, prompt_tokens: int,
                 new_tokens: int) -> tuple[list[list[int]], list[str]]:
    """(prompts, file names): one prompt from each of the first ``n_prompts`` validation
    ``.py`` files (sorted by name) whose text before the cut holds ``prompt_tokens`` tokens
    and after it ``new_tokens``."""
    from moe.data.corpus import stdlib_files
    from moe.data.split import split_names

    if data_cfg.source != "builtin":
        raise ValueError(f"the prompt-lookup workload reads the built-in corpus's validation "
                         f"files, and this run trained on data.source={data_cfg.source}")
    root, files = stdlib_files(data_cfg.code_max_mb)
    is_val = split_names([f"code/{rel}" for rel, _ in files], data_cfg.val_fraction, "code")
    prompts, names = [], []
    for (rel, _), val in zip(files, is_val):
        if not val:
            continue
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        cut = text.find("\n", len(text) // 2) + 1
        head = tokenizer.encode(text[:cut])
        if cut == 0 or len(head) < prompt_tokens or len(tokenizer.encode(text[cut:])) < new_tokens:
            continue
        prompts.append(head[-prompt_tokens:])
        names.append(rel)
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise ValueError(f"no validation file holds {prompt_tokens} + {new_tokens} tokens")
    return prompts, names


def load_code_workload(run: str, n_prompts: int, prompt_tokens: int, new_tokens: int) -> tuple:
    """(model, prompts, file names) of a trained run of the built-in corpus."""
    from moe.checkpoint import load_model
    from moe.data import BPETokenizer

    loaded = load_model(run)
    if loaded.tokenizer is None:
        raise ValueError(f"no tokenizer.json for {loaded.checkpoint}")
    room = loaded.cfg.model.max_seq_len
    if prompt_tokens + new_tokens >= room:
        raise ValueError(f"prompt {prompt_tokens} + {new_tokens} new tokens do not fit "
                         f"{run}'s model.max_seq_len={room} with room to verify")
    prompts, names = code_prompts(BPETokenizer.load(loaded.tokenizer), loaded.cfg.data,
                                  n_prompts, prompt_tokens, new_tokens)
    return loaded.model, prompts, names


def prompt_lookup_bench(model, prompts: list[list[int]], new_tokens: int, draft_tokens: int,
                        repeats: int, hf_model=None, max_ngram: int = 3, min_ngram: int = 1,
                        log: Callable[[str], None] | None = None) -> dict:
    """The section's keys (see the module docstring). ``hf_model``'s generation config is set
    to run the full length (no eos), as ours."""
    log = log or (lambda s: None)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    plain = Engine(model, 1)
    dec = SpeculativeDecoder(model, NgramProposer(max_ngram, min_ngram), draft_tokens)
    runs: dict[str, Callable[[], list[list[int]]]] = {
        "plain": lambda: [plain.generate([p], params)[0] for p in prompts],
        "prompt_lookup": lambda: [dec.generate(p, params) for p in prompts]}
    if hf_model is not None:
        hf_model.generation_config.eos_token_id = None
        runs["hf"] = _hf_runs(hf_model, prompts, new_tokens)
        runs["hf_prompt_lookup"] = _hf_runs(hf_model, prompts, new_tokens,
                                            prompt_lookup_num_tokens=draft_tokens,
                                            max_matching_ngram_size=max_ngram)
    total = new_tokens * len(prompts)
    walls: dict[str, list[float]] = {k: [] for k in runs}
    forwards: dict[str, int] = {k: 0 for k in runs}  # Hugging Face's, counted by a hook
    tokens: dict[str, list[list[int]]] = {}
    with torch.no_grad(), _CountForwards(hf_model) as counter:
        for fn in runs.values():
            fn()  # warm-up
        dec.stats.reset()
        for i in range(repeats):
            for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
                n0, t0 = counter.n, time.perf_counter()
                tokens[name] = runs[name]()
                walls[name].append(time.perf_counter() - t0)
                forwards[name] += counter.n - n0
                log(f"  run {i + 1}/{repeats} {name:16s} {total / walls[name][-1]:7.1f} tokens/s")
    out: dict = {"draft_tokens": draft_tokens, "max_ngram": max_ngram, "min_ngram": min_ngram,
                 "new_tokens": new_tokens, "prompts": len(prompts),
                 "prompt_tokens": [len(p) for p in prompts], "runs": repeats}
    for name, w in walls.items():
        out[name] = {"tokens_per_s": total / statistics.median(w), "wall_s": w}
    st = dec.stats
    per_round = (st.target_calls + st.plain_calls) / repeats  # target forwards, all prompts
    pl = out["prompt_lookup"]
    pl.update(st.to_dict(), target_forwards=per_round, tokens_per_forward=total / per_round)
    out["speedup"] = pl["tokens_per_s"] / out["plain"]["tokens_per_s"]
    # The mean forward of the prompt-lookup runs (a verify or a plain step, the proposer
    # included) in plain decode steps: the speedup is tokens_per_forward over it.
    pl["forward_over_step"] = pl["tokens_per_forward"] / out["speedup"]
    with torch.no_grad():  # why the speedup is less than tokens_per_forward: a verify's cost
        gen = torch.Generator().manual_seed(0)
        plain.prefill([0], [prompts[0]])
        forward_ms(plain, len(prompts[0]), 1, gen)  # warm-up
        out["target_step_ms"] = forward_ms(plain, len(prompts[0]), 1, gen)
        out["target_verify_ms"] = forward_ms(plain, len(prompts[0]), draft_tokens + 1, gen)
    out["verify_cost_ratio"] = out["target_verify_ms"] / out["target_step_ms"]
    out["same_tokens"] = tokens["prompt_lookup"] == tokens["plain"]
    if hf_model is not None:
        for name in ("hf", "hf_prompt_lookup"):
            out[name].update(target_forwards=forwards[name] / repeats,
                             tokens_per_forward=total * repeats / forwards[name])
        out["hf_same_tokens"] = tokens["hf"] == tokens["plain"]
        out["hf_prompt_lookup_same_tokens"] = tokens["hf_prompt_lookup"] == tokens["hf"]
        out["speedup_over_hf_prompt_lookup"] = (pl["tokens_per_s"]
                                                / out["hf_prompt_lookup"]["tokens_per_s"])
        out["hf_prompt_lookup_speedup"] = (out["hf_prompt_lookup"]["tokens_per_s"]
                                           / out["hf"]["tokens_per_s"])
    return out


def _hf_runs(hf_model, prompts: list[list[int]], new_tokens: int,
             **kw) -> Callable[[], list[list[int]]]:
    """Every prompt continued greedily by Hugging Face's ``generate`` (``kw`` added)."""
    def call() -> list[list[int]]:
        out = []
        for p in prompts:
            ids = hf_model.generate(torch.tensor([p]), max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0, **kw)
            out.append(ids[0, len(p):].tolist())
        return out
    return call


class _CountForwards:
    """Counts a module's forward calls while entered (nothing if the module is None)."""

    def __init__(self, module):
        self.module, self.n, self.handle = module, 0, None

    def __enter__(self) -> _CountForwards:
        if self.module is not None:
            self.handle = self.module.register_forward_pre_hook(self._count)
        return self

    def _count(self, *_) -> None:
        self.n += 1

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
