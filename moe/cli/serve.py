"""Serve a trained model over an OpenAI-compatible HTTP API (continuous batching).

    python scripts/serve.py --checkpoint runs/tiny [--port 8000] [--host 127.0.0.1] [--slots 8]
        [--model-name NAME] [--device auto] [--threads 0]
        [--max-waiting 256] [--request-timeout S] [--chat-template FILE]
        [--dtype fp32|bf16|int8] [--draft RUN [--draft-tokens 4] | --prompt-lookup N]

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "prompt": "def ", "max_tokens": 32, "temperature": 0}'

    torchrun --nproc_per_node=2 scripts/serve.py --checkpoint runs/tiny --parallel.tp=2

``--checkpoint``: a run folder (its newest good checkpoint), a ``step_*`` folder or a
consolidated file (``--run``: the same, in one process; torchrun takes ``--run`` for its own
``--run-path``). Under torchrun the model is split by ``--parallel.tp/pp/ep=N`` as training
splits it: rank 0 serves HTTP and drives the other ranks (moe/inference/distributed.py).
The model is served as ``--model-name`` (default: the run folder's name) at
``/v1/completions`` and ``/v1/chat/completions`` (streaming with ``"stream": true``) and
listed at ``/v1/models`` (with its context, ``max_model_len``: pass it to lm-eval as
``max_length``).
``--slots``: KV-cache slots, the most requests decoded together; more wait in a queue and are
admitted as others finish. Speculative decoding, exact (greedy: the same tokens; sampled:
the target's distribution), inside continuous batching (moe/inference/spec_batch.py):
``--draft RUN`` loads a draft model (same tokenizer; its own cache slots) and every request
speculates with it, ``--draft-tokens`` per step; ``--prompt-lookup N``: every request
speculates by prompt lookup, up to N tokens per step. A request's ``speculative`` field
overrides either (``{"method": "ngram"}`` works without a draft; ``{"method": "none"}``
turns it off); ``/metrics`` counts proposed and accepted tokens (one process only). Code:
moe/inference/server.py, moe/inference/scheduler.py; installed as the moe-serve command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from moe.checkpoint import CheckpointError, load_model
from moe.cli import (
    add_model_source,
    add_speculation,
    load_draft,
    model_source,
    refuse_across_ranks,
    speculation_of,
)
from moe.data import BPETokenizer
from moe.data.chat import load_chat_template
from moe.device import resolve_device, set_threads
from moe.inference.distributed import Driver, follow
from moe.inference.sharded import is_launched, load_sharded, parallel_settings
from moe.inference.weights import SERVING_DTYPES, cast_for_serving


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8,
                   help="KV-cache slots: requests decoded together (continuous batching)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the run folder's name)")
    add_speculation(p)
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests waiting for a slot beyond which new ones get a 429")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may take before it is cancelled and answered "
                        "with a 504 (default: no limit)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file for /v1/chat/completions (default: the "
                        "run's chat_template.jinja beside its tokenizer.json, else the "
                        "built-in one, moe/data/chat.py)")
    p.add_argument("--dtype", default="fp32", choices=SERVING_DTYPES,
                   help="weights for serving: bf16 (the KV cache too) or int8 weight-only "
                        "(fp32 activations and KV cache); the routers stay fp32 "
                        "(moe/inference/weights.py)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.slots < 1 or args.max_waiting < 0 or not 0 <= args.port < 65536:
        print(f"error: --slots {args.slots} must be >= 1, --max-waiting {args.max_waiting} "
              f">= 0 and --port {args.port} in [0, 65535]", file=sys.stderr)
        return 2
    if args.request_timeout is not None and not args.request_timeout > 0:
        print(f"error: --request-timeout {args.request_timeout} must be > 0 seconds (leave it "
              "out for no limit)", file=sys.stderr)
        return 2
    try:
        parallel = parallel_settings(rest)
        source = model_source(args)
        import uvicorn

        from moe.inference.server import build_app
    except ImportError as e:
        print(f"error: {e} (pip install fastapi uvicorn)", file=sys.stderr)
        return 2
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_launched() or parallel.world_size > 1:
        return sharded_main(args, source, parallel)
    try:
        speculation = speculation_of(args)
        device = resolve_device(args.device)
        set_threads(args.threads)
        loaded = load_model(source, device=device)
        draft = None if args.draft is None else \
            cast_for_serving(load_draft(args.draft, loaded, device), args.dtype)
    except (ValueError, OSError, CheckpointError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = _app(args, source, loaded.tokenizer, loaded.checkpoint,
               lambda: cast_for_serving(loaded.model, args.dtype), build_app,
               draft_model=draft, speculation=speculation)
    if app is None:
        return 2
    spec = "" if speculation is None else \
        f", speculative {speculation.method} up to {speculation.num_tokens} tokens"
    print(f"serving {loaded.checkpoint} as {app.state.server.model_name!r} on "
          f"http://{args.host}:{args.port}/v1 ({args.slots} slots, {device}, {args.dtype}{spec})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def sharded_main(args: argparse.Namespace, source: str, parallel) -> int:
    """Under torchrun: every rank loads its shards of the layout; rank 0 serves HTTP and
    drives the others (moe/inference/distributed.py) until the server stops."""
    import uvicorn

    from moe.inference.server import build_app

    try:
        refuse_across_ranks(args)
        set_threads(args.threads)
        sharded = load_sharded(source, parallel, args.device, "scripts/serve.py")
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cast_for_serving(sharded.model.part, args.dtype)
        if not sharded.is_driver:
            follow(sharded)
            return 0
        with Driver(sharded) as driver:
            app = _app(args, source, sharded.tokenizer, sharded.checkpoint,
                       lambda: driver.engine(n_slots=args.slots), build_app)
            if app is None:
                return 2
            print(f"serving {sharded.checkpoint} as {app.state.server.model_name!r} on "
                  f"http://{args.host}:{args.port}/v1 ({args.slots} slots, "
                  f"{sharded.dims.describe()}, {sharded.device}, {args.dtype})",
                  file=sys.stderr, flush=True)
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    finally:
        dist.destroy_process_group()


def _app(args: argparse.Namespace, source: str, tokenizer: Path | None, checkpoint: Path,
         model, build_app, **speculative):
    """The app over ``model()`` (a model or an engine), or None after printing the error.
    ``speculative``: build_app's ``draft_model`` and ``speculation``."""
    if tokenizer is None:
        print(f"error: no tokenizer.json for {checkpoint} (neither in its run folder nor "
              "in its data cache)", file=sys.stderr)
        return None
    try:
        template = load_chat_template(tokenizer, args.chat_template)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    try:  # e.g. a model whose routing is not causal: the engine refuses it
        return build_app(model(), BPETokenizer.load(tokenizer), n_slots=args.slots,
                         model_name=args.model_name or served_name(source),
                         max_waiting=args.max_waiting, chat_template=template,
                         request_timeout=args.request_timeout, **speculative)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def served_name(source: str) -> str:
    """The model id served by default: the run folder's name (of a step folder inside it,
    too), or a consolidated file's stem."""
    path = Path(source).resolve()
    if path.is_file():
        return path.stem
    if path.parent.name == "checkpoints":  # <run>/checkpoints/step_*
        return path.parent.parent.name
    return path.name


if __name__ == "__main__":
    raise SystemExit(main())
