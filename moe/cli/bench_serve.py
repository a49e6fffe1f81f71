"""Load-test the OpenAI-compatible server over loopback and check that it survives its clients.

    python scripts/bench_serve.py                          # a random configs/tiny.yaml model
    python scripts/bench_serve.py --run runs/tiny --threads 1 --json
    python scripts/bench_serve.py --requests 24 --clients 4 --model.d_model=64

Starts moe-serve as a subprocess on a free port (on ``--run``, or without it on a random model
of ``--config`` saved to a temporary folder, so nothing needs training; any
``--section.key=value`` overrides that config), warms it up, sends ``--requests`` requests
from ``--clients`` concurrent clients (shares of malformed ones, of streams cut off after
``--disconnect-after`` chunks and of ``temperature: 1e-40`` ones), then prints requests/s,
generated tokens/s, p50/p99 time to first token and inter-token latency, and the invariants,
PASS or FAIL each: every well-formed request answered 200 with a finish_reason, every
malformed one a 4xx in OpenAI's error shape, 1e-40 as greedy, nothing waiting or running
afterwards, resident memory flat (the larger of ``--rss-tolerance`` and
``--rss-tolerance-mb``), a normal request still answered, one stream per slot cut off
together no longer decoded, and a stop on one SIGTERM. Exit status 1 if any invariant fails,
2 for a usage error or a server that does not start.
Code: moe/bench/serve.py; installed as the moe-bench-serve command.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe.bench.serve import Settings
from moe.bench.serve_run import run_serve_bench


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", default=None, help="run folder to serve (default: a random model)")
    p.add_argument("--config", default=d.config, help="the random model's config")
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="the load plan and the random model's weights")
    p.add_argument("--malformed", type=float, default=d.malformed,
                   help="share of malformed requests (each must get a 4xx)")
    p.add_argument("--disconnect", type=float, default=d.disconnect,
                   help="share of streams the client closes mid-stream")
    p.add_argument("--tiny-temperature", type=float, default=d.tiny_temperature,
                   help="share of requests at temperature 1e-40 (must be greedy)")
    p.add_argument("--stream", type=float, default=d.stream,
                   help="share of the other well-formed requests that stream")
    p.add_argument("--disconnect-after", type=int, default=d.disconnect_after,
                   help="chunks a disconnecting client reads before it closes")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="prompts of 1..N characters (default: 3/8 of the context)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens drawn from 1..N (default: half the context)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="requests before the load (memory is measured after them)")
    p.add_argument("--slots", type=int, default=d.slots, help="the server's KV-cache slots")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="the server's torch threads (0: torch's default)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="the server's --max-waiting")
    p.add_argument("--settle", type=float, default=d.settle_s,
                   help="seconds allowed after the load for every slot to free")
    p.add_argument("--stop-timeout", type=float, default=d.stop_timeout_s,
                   help="seconds allowed for the server to exit after SIGTERM")
    p.add_argument("--rss-tolerance", type=float, default=d.rss_tolerance_frac,
                   help="resident memory growth allowed, as a fraction of the warm figure")
    p.add_argument("--rss-tolerance-mb", type=float, default=d.rss_tolerance_mb,
                   help="resident memory growth allowed in MB (the larger of the two counts)")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} "
                "(overrides look like --section.key=value)")
    if overrides and args.run is not None:
        p.error("--section.key=value overrides apply to the random model: not with --run")
    shares = (args.malformed, args.disconnect, args.tiny_temperature, args.stream)
    if (args.requests < 1 or args.clients < 1 or args.warmup < 0 or args.disconnect_after < 1
            or any(not 0 <= f <= 1 for f in shares) or sum(shares[:3]) > 1):
        p.error("--requests, --clients and --disconnect-after must be >= 1, --warmup >= 0, "
                "each share in [0, 1] and --malformed + --disconnect + --tiny-temperature <= 1")
    s = Settings(run=args.run, config=args.config, overrides=overrides, requests=args.requests,
                 clients=args.clients, seed=args.seed, malformed=args.malformed,
                 disconnect=args.disconnect, tiny_temperature=args.tiny_temperature,
                 stream=args.stream, disconnect_after=args.disconnect_after,
                 max_prompt_chars=args.max_prompt_chars, max_tokens=args.max_tokens,
                 warmup=args.warmup, slots=args.slots, threads=args.threads,
                 max_waiting=args.max_waiting, settle_s=args.settle,
                 stop_timeout_s=args.stop_timeout, rss_tolerance_frac=args.rss_tolerance,
                 rss_tolerance_mb=args.rss_tolerance_mb)
    log = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        r = run_serve_bench(s, log or (lambda m: None))
    except (RuntimeError, ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else report(r))
    return 0 if r["passed"] else 1


def report(r: dict) -> str:
    """The human-readable table of ``run_serve_bench``'s result."""
    s, k = r["settings"], r["kinds"]

    def pair(d: dict) -> str:
        return " ".join(f"{q} {'-' if d[q] is None else f'{d[q]:.1f}'} ms" for q in ("p50", "p99"))

    lines = [
        f"moe-bench-serve: {r['run']} as {r['model']!r} (context {r['context']}); "
        f"{s['slots']} slots, {s['threads'] or 'default'} server threads",
        f"{r['machine']}; 1-min load average {r['loadavg_start']:.1f} -> {r['loadavg_end']:.1f}",
        f"{r['requests']} requests from {s['clients']} clients ({k['malformed']} malformed, "
        f"{k['disconnect']} cut off, {r['tiny_temperature']} at temperature 1e-40, "
        f"{r['streaming']} streaming) in {r['wall_s']:.1f} s",
        "",
        f"  throughput            {r['requests_per_s']:.2f} requests/s, "
        f"{r['generated_tokens_per_s']:.1f} generated tokens/s (server's count, the cut-off "
        f"streams included: {r['server_generated_tokens_per_s']:.1f})",
        f"  time to first token   {pair(r['ttft_ms'])} ({r['ttft_ms']['n']} streams)",
        f"  inter-token latency   {pair(r['itl_ms'])} ({r['itl_ms']['n']} gaps)",
        "  outcomes (/metrics)   " + ", ".join(f"{o} {n:.0f}" for o, n in r["outcomes"].items()),
        "",
    ]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}"
              for c in r["checks"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
