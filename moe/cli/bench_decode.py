"""Decode benchmark: tokens/s at batch 1 against Hugging Face generate(), KV-cache bytes per
token (MQA vs MHA), and tokens per expert per decode step at batch 1, 8 and 64.

    python scripts/bench_decode.py                       # human-readable
    python scripts/bench_decode.py --json                # one JSON object
    python scripts/bench_decode.py --repeats 5 --train.threads=1 --no-hf

The model is configs/bench.yaml with dropless routing, initialised from train.seed; both
sides decode greedily from the same random prompt (moe/bench/decode.py says how it is
timed). Any --section.key=value overrides the config. Speculative decoding: ``--target RUN
--draft RUN`` (trained runs, e.g. of configs/tiny.yaml and configs/draft.yaml); without them
random models (nothing trained: the rates, not a useful speedup; see
moe/bench/speculative.py).

    python scripts/bench_decode.py --prompt-lookup 4 --target RUN [--code-prompts 8]

``--prompt-lookup N`` runs, instead of the sections above, prompt lookup on code completion:
RUN's model (a run of the built-in corpus) continues prompts cut from the validation split's
Python files, greedy, plain and with up to N tokens looked up per target call, ours and
Hugging Face's (moe/bench/prompt_lookup.py); --prompt-tokens and --new-tokens default to 256
and 160 there. ``--scheduler-slots 1,4`` runs instead the same workload through the
continuous-batching scheduler, plain and with every request speculating by prompt lookup, at
each number of slots (moe/bench/spec_serving.py).

    python scripts/bench_decode.py --speculative-only --target RUN --draft RUN --draft-tokens 1,2,4

``--speculative-only`` runs only the draft-model section, for each listed gamma: the measured
speedup beside the cost model's prediction from the measured step, draft, verify and
sampling costs and the acceptance rate (moe/bench/speculative.py).

    python scripts/bench_decode.py --compile --config configs/tiny.yaml --new-tokens 96

``--compile`` runs only compiled against eager decode at batch 1 on the config's model
(moe/bench/compiled.py; the first compiled call, which compiles, is timed apart).

    python scripts/bench_decode.py --quality RUN [RUN ...] [--windows 256] [--dtypes bf16,int8]

``--quality`` runs, instead, the quality cost of the serving dtypes on trained runs: validation
loss and greedy agreement with fp32 over validation windows (moe/bench/dtypes.py). In the
main benchmark ``--dtypes`` lists the dtypes whose decode speed and weight bytes are measured
against fp32 (default fp32,bf16,int8; ``--dtypes=`` skips the section).
"""

from __future__ import annotations

import argparse
import json
import sys

from moe.bench.decode import bench_config, run_decode_bench
from moe.config import Config, ConfigError
from moe.inference.weights import SERVING_DTYPES


def _machine_line(r: dict) -> str:
    """The machine, threads and load a result was measured under, as its first line."""
    return (f"\n{r['machine']}; {r['threads']} threads; 1-min load average "
            f"{r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Any --section.key=value overrides the config.")
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="default 32; 256 with --prompt-lookup")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="default 224; 160 with --prompt-lookup")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    p.add_argument("--stat-steps", type=int, default=16,
                   help="decode steps counted for the MoE statistics")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face (no transformers)")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.add_argument("--target", default=None, metavar="RUN",
                   help="speculative decoding: the target's run (with --draft)")
    p.add_argument("--draft", default=None, metavar="RUN",
                   help="speculative decoding: the draft's run (with --target)")
    p.add_argument("--draft-tokens", default="4",
                   help="tokens drafted per target call (gamma); several, comma-separated "
                        "(e.g. 1,2,3,4,5,6), are each timed and the cost model picks the best")
    p.add_argument("--spec-new-tokens", type=int, default=64,
                   help="new tokens per prompt in the speculative section")
    p.add_argument("--no-speculative", action="store_true", help="skip speculative decoding")
    p.add_argument("--compile", action="store_true",
                   help="only compiled against eager decode at batch 1 (torch.compile)")
    p.add_argument("--speculative-only", action="store_true",
                   help="only the speculative section (with --target and --draft)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="only prompt lookup on code completion, N tokens per target call "
                        "(with --target)")
    p.add_argument("--max-ngram", type=int, default=3, help="prompt lookup's longest n-gram")
    p.add_argument("--scheduler-slots", default=None, metavar="N,N",
                   help="with --prompt-lookup: the workload through the continuous-batching "
                        "scheduler at these slot counts instead (e.g. 1,4)")
    p.add_argument("--code-prompts", type=int, default=8,
                   help="validation files prompted in the prompt-lookup section")
    p.add_argument("--dtypes", default=",".join(SERVING_DTYPES),
                   help="serving dtypes timed against fp32 (comma-separated; empty: skip)")
    p.add_argument("--quality", nargs="+", default=None, metavar="RUN",
                   help="only the quality cost of --dtypes on these trained runs")
    p.add_argument("--windows", type=int, default=256,
                   help="validation windows per run with --quality")
    args, overrides = p.parse_known_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    unknown = [d for d in dtypes if d not in SERVING_DTYPES]
    if unknown:
        p.error(f"--dtypes {','.join(unknown)}: choose from {','.join(SERVING_DTYPES)}")
    try:
        args.draft_tokens = [int(g) for g in args.draft_tokens.split(",")]
    except ValueError:
        p.error(f"--draft-tokens {args.draft_tokens}: want integers, comma-separated")
    if min(args.draft_tokens) < 1:
        p.error(f"--draft-tokens {','.join(map(str, args.draft_tokens))}: each must be >= 1")
    lookup = args.prompt_lookup > 0
    if args.prompt_tokens is None:
        args.prompt_tokens = 256 if lookup else 32
    if args.new_tokens is None:
        args.new_tokens = 160 if lookup else 224
    if args.scheduler_slots is not None:
        try:
            args.scheduler_slots = [int(x) for x in args.scheduler_slots.split(",") if x]
        except ValueError:
            args.scheduler_slots = []
        if not lookup or not args.scheduler_slots or min(args.scheduler_slots) < 1:
            p.error("--scheduler-slots takes slot counts >= 1, comma-separated (e.g. 1,4), "
                    "with --prompt-lookup N")
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} "
                "(overrides look like --section.key=value)")
    if args.repeats < 1 or args.prompt_tokens < 1 or args.new_tokens < 1 or args.stat_steps < 1:
        p.error("--repeats, --prompt-tokens, --new-tokens and --stat-steps must be >= 1")
    try:
        cfg = bench_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    log = None if args.json else (lambda s: print(s, flush=True))
    if args.quality:
        return quality_main(args, cfg, dtypes or SERVING_DTYPES, log)
    if lookup:
        return prompt_lookup_main(args, cfg, log)
    if args.speculative_only:
        return speculative_main(args, cfg, log)
    if args.compile:
        return compile_main(args, cfg, log)
    try:
        r = run_decode_bench(cfg, prompt_len=args.prompt_tokens, new_tokens=args.new_tokens,
                             repeats=args.repeats, stat_steps=args.stat_steps,
                             hf=not args.no_hf, target_run=args.target, draft_run=args.draft,
                             draft_tokens=args.draft_tokens,
                             spec_new_tokens=args.spec_new_tokens,
                             speculative=not args.no_speculative, dtypes=dtypes, log=log)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    print(_machine_line(r))
    print(f"decode, batch 1 (median of {r['runs']} runs, {r['new_tokens']} new tokens):")
    print(f"  ours           {r['tokens_per_s']:8.1f} tokens/s")
    print(f"  ours, sorted MoE path {r['tokens_per_s_reference']:8.1f} tokens/s")
    if "hf_tokens_per_s" in r:
        print(f"  HF generate()  {r['hf_tokens_per_s']:8.1f} tokens/s   ours / HF = "
              f"{r['speedup_over_hf']:.2f}x (paired by turn: {r['speedup_over_hf_paired']:.2f}x, "
              f"CPU time: {r['speedup_over_hf_cpu']:.2f}x)")
        print(f"  fastest runs   ours {r['tokens_per_s_best']:.1f}, HF "
              f"{r['hf_tokens_per_s_best']:.1f} tokens/s")
        same = "yes" if r["same_tokens"] else f"no, first differs at {r['first_mismatch']}"
        print(f"  same greedy tokens as HF: {same}")
    if "fp32_tokens_per_s" in r:
        print(f"serving dtypes, batch 1 (median of {r['dtypes']['runs']} runs):")
        for d in SERVING_DTYPES:
            if f"{d}_tokens_per_s" in r:
                vs = f", {r[f'{d}_over_fp32']:.2f}x fp32 (paired)" if d != "fp32" else ""
                print(f"  {d:5s} {r[f'{d}_tokens_per_s']:8.1f} tokens/s, weights "
                      f"{r[f'{d}_weight_bytes'] / 1e6:.1f} MB{vs}")
    print(f"KV cache per token: {r['kv_cache_bytes_per_token']:.0f} B (n_kv_heads="
          f"{r['config']['n_kv_heads']}) vs {r['kv_cache_bytes_per_token_mha']:.0f} B multi-head "
          f"({r['kv_cache_mha_over_mqa']:.0f}x)")
    print("tokens per expert per decode step:")
    for name, st in r["moe_decode"].items():
        print(f"  {name:9s} mean {st['tokens_per_expert_mean']:.2f}, "
              f"max {st['tokens_per_expert_max_mean']:.2f}, "
              f"experts used {st['experts_used_mean']:.1f}, "
              f"with 0 tokens {st['frac_experts_0_tokens']:.0%}, "
              f"with 0-1 {st['frac_experts_0_or_1']:.0%}")
    if "speculative" in r:
        print_speculative(r["speculative"])
    return 0


def print_speculative(sp: dict) -> None:
    """The speculative section: the step costs, then per gamma and mode the measured speedup
    beside the cost model's."""
    models = "random models" if sp["models"] == "random" else f"{sp['target']} / {sp['draft']}"
    print(f"speculative decoding ({models}, {sp['prompts']} prompts x {sp['new_tokens']} "
          f"tokens, median of {sp['runs']}): target step t {sp['target_step_ms']:.3f} ms, "
          f"draft step d {sp['draft_step_ms']:.3f} ms (d/t {sp['cost_ratio']:.2f}), a sampling "
          f"draw s {sp['sample_ms']:.3f} ms")
    print("  gamma mode     v/t   accept (1-TV)  tokens/call  speedup  predicted "
          "(cost model; verify = 1 step)")
    for g, row in sp["by_gamma"].items():
        for mode in ("greedy", "sampled"):
            e = row[mode]
            print(f"  {int(g):5d} {mode:8s} {row['verify_cost_ratio']:4.2f}  "
                  f"{e['acceptance_rate']:.3f} ({e['acceptance_rate_predicted']:.3f})  "
                  f"{e['tokens_per_target_call']:5.2f} "
                  f"({e['tokens_per_target_call_predicted']:.2f})  {e['speedup']:5.2f}x  "
                  f"{e['speedup_predicted_cost_model']:5.2f}x; "
                  f"{e['speedup_predicted']:.2f}x")
            for key, what in (("in_run", "wall"), ("in_run_cpu", "CPU ")):
                ir = e[key]
                speedup = e["speedup_cpu"] if key == "in_run_cpu" else e["speedup"]
                print(f"{'':16s}{what} in the runs: t {ir['target_step_ms']:.2f}, "
                      f"d {ir['draft_step_ms']:.2f}, v {ir['verify_ms']:.2f} ms, other "
                      f"{ir['other_ms_per_plain_token']:.2f} a plain token, "
                      f"{ir['other_ms_per_call']:.2f} a call; speedup {speedup:.2f}x, "
                      f"predicted {e[f'speedup_predicted_{key}']:.2f}x")
    for mode in ("greedy", "sampled"):
        print(f"  best gamma, {mode}: measured {sp[f'best_gamma_{mode}']}, predicted "
              f"{sp[f'best_gamma_{mode}_predicted']}; by CPU time measured "
              f"{sp[f'best_gamma_{mode}_cpu']}, predicted from the runs' costs "
              f"{sp[f'best_gamma_{mode}_predicted_in_run_cpu']}")


def compile_main(args: argparse.Namespace, cfg: Config, log) -> int:
    """--compile: the compiled-decode section alone, on the config's model (random weights
    from train.seed, a random prompt)."""
    import torch

    from moe.bench.compiled import compiled_speed
    from moe.bench.decode import _loadavg, _machine
    from moe.device import set_threads
    from moe.model import build_model

    m = cfg.model
    if args.prompt_tokens + args.new_tokens > m.max_seq_len:
        print(f"error: prompt {args.prompt_tokens} + {args.new_tokens} new tokens exceed "
              f"model.max_seq_len={m.max_seq_len}", file=sys.stderr)
        return 2
    threads = set_threads(cfg.train.threads)
    r = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg(),
         "config": args.config}
    model = build_model(m, seed=cfg.train.seed).eval()
    g = torch.Generator().manual_seed(cfg.train.seed)
    prompt = torch.randint(1, m.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    if log:
        log(f"compiled decode, batch 1: {args.config}, prompt {args.prompt_tokens}, "
            f"{args.new_tokens} new tokens, {args.repeats} runs each, {threads} threads")
    r.update(compiled_speed(model, prompt, args.new_tokens, args.repeats, log))
    r["loadavg_end"] = _loadavg()
    if args.json:
        print(json.dumps(r))
        return 0
    print(_machine_line(r) + f"; median of {r['runs']} runs")
    print(f"  eager    {r['eager_tokens_per_s']:8.1f} tokens/s (first call "
          f"{r['eager_first_s']:.1f} s)")
    print(f"  compiled {r['compiled_tokens_per_s']:8.1f} tokens/s (first call, compiling: "
          f"{r['compile_s']:.1f} s); {r['compiled_over_eager']:.2f}x eager; same tokens: "
          f"{r['same_tokens']}, logits within {r['max_abs_logit_diff']:.1e}")
    return 0


def speculative_main(args: argparse.Namespace, cfg: Config, log) -> int:
    """--speculative-only: the draft-model section alone, on two trained runs."""
    from moe.bench.decode import _loadavg, _machine
    from moe.bench.speculative import load_pair, speculative_bench
    from moe.device import set_threads

    try:
        if args.target is None or args.draft is None:
            raise ValueError("--speculative-only takes --target RUN and --draft RUN")
        threads = set_threads(cfg.train.threads)
        r = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg()}
        if log:
            log(f"speculative decoding: {args.target} / {args.draft}, gamma "
                f"{','.join(map(str, args.draft_tokens))}, {threads} threads")
        section = speculative_bench(*load_pair(args.target, args.draft), args.spec_new_tokens,
                                    args.draft_tokens, args.repeats, cfg.train.seed,
                                    log or (lambda s: None))
        section.update(models="runs", target=args.target, draft=args.draft)
        r.update(speculative=section, loadavg_end=_loadavg())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    print(_machine_line(r))
    print_speculative(section)
    return 0


def quality_main(args: argparse.Namespace, cfg: Config, dtypes: tuple[str, ...], log) -> int:
    """--quality RUN ...: validation loss and greedy agreement of each dtype against fp32."""
    from moe.analysis.windows import val_windows
    from moe.bench.decode import _loadavg, _machine
    from moe.bench.dtypes import dtype_quality
    from moe.checkpoint import CheckpointError, load_model
    from moe.data import prepare_data
    from moe.device import set_threads

    threads = set_threads(cfg.train.threads)
    r: dict = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg(),
               "dtypes": list(dtypes), "runs": {}}
    try:
        if args.windows < 1:
            raise ValueError(f"--windows {args.windows} must be >= 1")
        for run in args.quality:
            loaded = load_model(run)
            windows = val_windows(prepare_data(loaded.cfg), loaded.cfg.data.seq_len + 1,
                                  args.windows)
            if log:
                log(f"{run}: {len(windows)} validation windows of {windows.shape[1] - 1} tokens")
            r["runs"][run] = dtype_quality(loaded.model, windows, dtypes,
                                           log=log or (lambda s: None))
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r["loadavg_end"] = _loadavg()
    if args.json:
        print(json.dumps(r))
        return 0
    for run, q in r["runs"].items():
        print(f"\n{run}: {q['windows']} windows of {q['window_tokens']} tokens; greedy: "
              f"{q['prompt_tokens']}-token prompts, {q['greedy_new_tokens']} new tokens")
        for d in ("fp32", *[d for d in dtypes if d != "fp32"]):
            e = q[d]
            line = (f"  {d:5s} val loss {e['val_loss']:.4f}, weights "
                    f"{e['weight_bytes'] / 1e6:.2f} MB")
            if d != "fp32":
                line += (f"; {e['val_loss_delta']:+.4f} ± {e['val_loss_delta_se']:.4f} vs fp32, "
                         f"top-1 agreement {e['top1_agreement']:.3f}, greedy same tokens "
                         f"{e['greedy_same_tokens']:.3f}, identical prefix "
                         f"{e['greedy_identical_prefix']:.1f}")
            print(line)
    return 0


def prompt_lookup_main(args: argparse.Namespace, cfg: Config, log) -> int:
    """--prompt-lookup N: the code-completion section alone."""
    from moe.bench.decode import _loadavg, _machine
    from moe.bench.prompt_lookup import load_code_workload, prompt_lookup_bench
    from moe.device import set_threads

    try:
        if args.target is None or args.draft is not None:
            raise ValueError("--prompt-lookup takes --target RUN (a trained run: a random "
                             "model does not copy its prompt) and no --draft")
        if args.code_prompts < 1 or args.max_ngram < 1:
            raise ValueError("--code-prompts and --max-ngram must be >= 1")
        threads = set_threads(cfg.train.threads)
        model, prompts, names = load_code_workload(args.target, args.code_prompts,
                                                   args.prompt_tokens, args.new_tokens)
        if args.scheduler_slots is not None:
            return scheduler_main(args, model, prompts, names, threads, log)
        hf_model = None
        if not args.no_hf:
            import warnings

            from moe.hf.export import to_mixtral_model

            with warnings.catch_warnings():  # eval capacity: both sides decode dropless
                warnings.simplefilter("ignore")
                hf_model = to_mixtral_model(model)
        r = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg(),
             "target": args.target, "files": names}
        if log:
            log(f"prompt lookup: {len(prompts)} prompts of {args.prompt_tokens} tokens from "
                f"{args.target}'s validation files, {args.new_tokens} new tokens, "
                f"{args.prompt_lookup} per target call, {threads} threads")
        r.update(prompt_lookup_bench(model, prompts, args.new_tokens, args.prompt_lookup,
                                     args.repeats, hf_model, args.max_ngram, log=log))
        r["loadavg_end"] = _loadavg()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    print(_machine_line(r) + f"; median of {r['runs']} runs")
    for name in ("plain", "prompt_lookup", "hf", "hf_prompt_lookup"):
        if name in r:
            e = r[name]
            rate = (f", {e['tokens_per_forward']:.2f} tokens per target forward"
                    if "tokens_per_forward" in e else "")
            print(f"  {name:17s} {e['tokens_per_s']:8.1f} tokens/s{rate}")
    pl = r["prompt_lookup"]
    print(f"  prompt lookup / plain {r['speedup']:.2f}x; acceptance {pl['acceptance_rate']:.3f}, "
          f"{pl['tokens_per_target_call']:.2f} tokens per verify; same tokens as plain: "
          f"{r['same_tokens']}; a verify of {r['draft_tokens'] + 1} tokens costs "
          f"{r['verify_cost_ratio']:.2f} decode steps")
    if "hf" in r:
        print(f"  ours / HF prompt lookup {r['speedup_over_hf_prompt_lookup']:.2f}x; HF prompt "
              f"lookup / HF plain {r['hf_prompt_lookup_speedup']:.2f}x; HF plain = ours: "
              f"{r['hf_same_tokens']}, HF prompt lookup = HF plain: "
              f"{r['hf_prompt_lookup_same_tokens']}")
    return 0


def scheduler_main(args: argparse.Namespace, model, prompts, names, threads: int, log) -> int:
    """--prompt-lookup N --scheduler-slots 1,4: prompt lookup in the continuous batcher."""
    from moe.bench.decode import _loadavg, _machine
    from moe.bench.spec_serving import scheduler_prompt_lookup_bench

    slots = args.scheduler_slots  # checked in main
    r = {"machine": _machine(), "threads": threads, "loadavg_start": _loadavg(),
         "target": args.target, "files": names}
    if log:
        log(f"prompt lookup in the scheduler: {len(prompts)} prompts of {args.prompt_tokens} "
            f"tokens, {args.new_tokens} new tokens, {args.prompt_lookup} per step, slots "
            f"{slots}, {threads} threads")
    r.update(scheduler_prompt_lookup_bench(model, prompts, args.new_tokens, args.prompt_lookup,
                                           slots, args.repeats, args.max_ngram, log=log))
    r["loadavg_end"] = _loadavg()
    if args.json:
        print(json.dumps(r))
        return 0
    print(_machine_line(r) + f"; median of {r['runs']} runs")
    for n in slots:
        e = r[f"slots_{n}"]
        pl = e["prompt_lookup"]
        print(f"  {n} slots: plain {e['plain']['tokens_per_s']:7.1f} tokens/s, prompt lookup "
              f"{pl['tokens_per_s']:7.1f} ({e['speedup']:.2f}x; acceptance "
              f"{pl['acceptance_rate']:.3f}, {pl['tokens_per_verify']:.2f} tokens per verify, "
              f"steps {pl['steps']} vs {e['plain']['steps']}); same tokens: {e['same_tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
