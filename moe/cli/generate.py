"""Generate text from a trained model, streaming it to the terminal as it is decoded.

    python scripts/generate.py --checkpoint runs/tiny --prompt "def " [--prompt "class "]
        [--prompt-file FILE] [--max-new-tokens 200] [--temperature 0.8] [--top-k 50]
        [--top-p 1.0] [--seed 0] [--ignore-eot] [--batch] [--device auto] [--threads 0]
        [--draft RUN] [--draft-tokens 4] [--prompt-lookup 4] [--dtype fp32|bf16|int8]
    python scripts/generate.py --checkpoint runs/vision_tiny --image shapes.png [--prompt "a"]
    torchrun --nproc_per_node=4 scripts/generate.py --checkpoint runs/tiny \
        --parallel.tp=2 --parallel.pp=2 --temperature 0 --prompt "def "

``--checkpoint``: a run folder (its newest good checkpoint), a ``step_*`` folder or a
consolidated file (``--run`` is the same, in one process: torchrun takes ``--run`` for its own
``--run-path``). Under torchrun the model is split by ``--parallel.tp/pp/ep=N`` (their product
the number of processes), as training splits it, and rank 0 prints exactly what one process
prints (moe/inference/distributed.py; not with --draft, --prompt-lookup, --image or --dtype
int8). Prompts: each ``--prompt``, and those of
``--prompt-file`` (prompts separated by lines holding only ``---``; ``-`` reads stdin); none
given: "def ". Generation stops at ``<|endoftext|>`` unless ``--ignore-eot``. Each prompt is
streamed in turn; ``--batch`` decodes them together (one KV-cache slot each) and prints each
when done: the same tokens, as every prompt draws from its own generator seeded ``--seed``.
``--temperature 0`` is greedy. ``--draft RUN``: speculative decoding with that run's model as
the draft (same tokenizer; ``--draft-tokens`` drafted per target call, at most 16): greedy
gives the same text as without it; the acceptance rate goes to stderr. ``--prompt-lookup N``:
speculative decoding with no draft model, up to N tokens copied per target call from what
followed the last tokens' previous occurrence in the prompt or output (moe/inference/ngram.py);
the same rules as ``--draft``, not with it. With ``--batch`` either speculates inside the
continuous-batching scheduler, all prompts verified in one target forward per step
(moe/inference/spec_batch.py): the same text as ``--batch`` without it, greedy.
``--dtype``: the weights decoding runs with (the target's and the draft's), as ``moe-serve
--dtype``: bf16, or int8 weight-only with fp32 activations; routers stay fp32
(moe/inference/weights.py).
``--timing``: the decode speed on stderr, ms per token after each prompt's first (the prefill
left out), median over the prompts.
``--image PATH`` (a vision run, vision.enabled): caption a PNG / JPEG image (resized to
vision.image_size) by continuing each prompt (default "a", the start of every caption;
"q: what colour is the circle? a:" asks a question) after the image, without a KV cache
(moe/vision/caption.py). Code: moe/inference/ (engine, sampling, speculative);
installed as the moe-generate command.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
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
from moe.device import resolve_device, set_threads
from moe.inference import Engine, Request, SamplingParams, Scheduler
from moe.inference.distributed import Driver, follow
from moe.inference.ngram import NgramProposer
from moe.inference.sharded import is_launched, load_sharded, parallel_settings
from moe.inference.spec_batch import Speculation
from moe.inference.speculative import SpeculativeDecoder
from moe.inference.weights import SERVING_DTYPES, cast_for_serving

SEPARATOR = "---"


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        parts, cur = [], []
        for line in text.splitlines(keepends=True):
            if line.strip() == SEPARATOR:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(line)
        parts.append("".join(cur))
        prompts += [p for p in parts if p.strip()]
    return prompts or ["def "]


class Detokenizer:
    """Text of a growing token list, given out as the new part each time. Byte-level BPE can
    split a character across tokens: text ending in an incomplete one (U+FFFD) waits."""

    def __init__(self, tokenizer: BPETokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[self.shown:], len(text)
        return new


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_source(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None,
                   help=f"prompts separated by lines holding only {SEPARATOR!r} (- for stdin)")
    p.add_argument("--max-new-tokens", "--tokens", dest="max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: every token")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eot", action="store_true",
                   help="do not stop at <|endoftext|>")
    p.add_argument("--batch", action="store_true",
                   help="decode all prompts together; print each when done")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_speculation(p)
    p.add_argument("--dtype", default="fp32", choices=SERVING_DTYPES,
                   help="weights for decoding: bf16 (the KV cache too) or int8 weight-only "
                        "(fp32 activations); the routers stay fp32 (moe/inference/weights.py)")
    p.add_argument("--timing", action="store_true",
                   help="print to stderr the ms per decoded token (each prompt after its "
                        "first token, i.e. without the prefill; streamed mode)")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="caption this image (a vision run): the prompts continue after it")
    return p


def caption_main(args: argparse.Namespace, loaded, tokenizer: BPETokenizer,
                 params: SamplingParams) -> int:
    """--image: each prompt continued after the image (a vision run's model)."""
    from moe.vision.caption import caption_image
    from moe.vision.data import load_image

    cfg = loaded.cfg
    try:
        if not cfg.vision.enabled:
            raise ValueError(f"--image needs a vision run (vision.enabled), and "
                             f"{loaded.checkpoint} is a text model")
        if args.draft or args.batch or args.prompt_lookup is not None:
            raise ValueError("--image captions one image without --draft, --prompt-lookup or "
                             "--batch")
        image = load_image(args.image, cfg.vision.image_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or (read_prompts(args) if args.prompt_file else ["a"])
    for i, text in enumerate(prompts):
        if len(prompts) > 1:
            sys.stdout.write(f"=== {i + 1}/{len(prompts)}\n")
        ids = tokenizer.encode(text)
        new = caption_image(loaded.model, image, [tokenizer.eot_id, *ids],
                            max_new_tokens=params.max_new_tokens, params=params,
                            generator=torch.Generator().manual_seed(args.seed))
        sys.stdout.write(tokenizer.decode(ids + [t for t in new if t != tokenizer.eot_id]) + "\n")
    return 0


def batch_generate(new_engine: Callable[[int], Engine], draft, prompts: list[list[int]],
                   params: SamplingParams, seed: int, speculation: Speculation | None
                   ) -> tuple[list[list[int]], object]:
    """--batch: the prompts decoded together, each from its own generator seeded ``seed``;
    with speculation through the continuous-batching scheduler (every prompt speculates, in
    one target forward per step); returns (new tokens per prompt, the speculative stats or
    None). ``new_engine(n_slots)``."""
    engine = new_engine(len(prompts))
    if speculation is None:
        gens = [torch.Generator().manual_seed(seed) for _ in prompts]
        return engine.generate(prompts, params, gens), None
    sched = Scheduler(engine, draft=None if draft is None else Engine(draft, len(prompts)))
    news = sched.run([Request(p, params, seed=seed, speculative=speculation) for p in prompts])
    return news, sched.spec_stats


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    try:
        parallel = parallel_settings(rest)
        source = model_source(args)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p)
        prompts = read_prompts(args)
        speculation = speculation_of(args)
        if args.image and args.dtype != "fp32":
            raise ValueError(f"--dtype {args.dtype} is for KV-cached text decoding; --image "
                             "captions in fp32")
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_launched() or parallel.world_size > 1:
        return sharded_main(args, source, parallel, params, prompts)
    try:
        device = resolve_device(args.device)
        set_threads(args.threads)
        loaded = load_model(source, device=device)
        cast_for_serving(loaded.model, args.dtype)
        draft = None
        if args.draft:
            draft = cast_for_serving(load_draft(args.draft, loaded, device), args.dtype)
        spec = None
        if speculation is not None and not args.batch:
            spec = SpeculativeDecoder(loaded.model, NgramProposer(speculation.max_ngram,
                                                                  speculation.min_ngram)
                                      if draft is None else draft, speculation.num_tokens)
    except (ValueError, OSError, CheckpointError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = _tokenizer(loaded.tokenizer, loaded.checkpoint)
    if tokenizer is None:
        return 2
    if not args.ignore_eot:  # the run's end-of-text (an imported run's is its folder's eos)
        params = dataclasses.replace(params, stop_tokens=(tokenizer.eot_id,))
    if args.image:
        return caption_main(args, loaded, tokenizer, params)
    return write_generations(args, prompts, params, tokenizer,
                             lambda n: Engine(loaded.model, n_slots=n), spec, draft, speculation)


def sharded_main(args: argparse.Namespace, source: str, parallel, params: SamplingParams,
                 prompts: list[str]) -> int:
    """Under torchrun: every rank loads its shards of the layout; rank 0 tokenizes, samples
    and prints exactly what one process prints, the others follow (moe/inference/
    distributed.py)."""
    try:
        refuse_across_ranks(args)
        set_threads(args.threads)
        sharded = load_sharded(source, parallel, args.device, "scripts/generate.py")
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cast_for_serving(sharded.model.part, args.dtype)
        if not sharded.is_driver:
            follow(sharded)
            return 0
        with Driver(sharded) as driver:
            tokenizer = _tokenizer(sharded.tokenizer, sharded.checkpoint)
            if tokenizer is None:
                return 2
            if not args.ignore_eot:
                params = dataclasses.replace(params, stop_tokens=(tokenizer.eot_id,))
            return write_generations(args, prompts, params, tokenizer,
                                     lambda n: driver.engine(n_slots=n), None)
    finally:
        dist.destroy_process_group()


def _tokenizer(path: Path | None, checkpoint: Path) -> BPETokenizer | None:
    if path is None:
        print(f"error: no tokenizer.json for {checkpoint} (neither in its run folder nor "
              "in its data cache)", file=sys.stderr)
        return None
    return BPETokenizer.load(path)


def write_generations(args: argparse.Namespace, prompts: list[str], params: SamplingParams,
                      tokenizer: BPETokenizer, new_engine: Callable[[int], Engine],
                      spec: SpeculativeDecoder | None, draft=None,
                      speculation: Speculation | None = None) -> int:
    """Decode every prompt and write it to stdout: streamed one prompt after another (through
    ``spec`` if given), or with ``--batch`` all together, each printed when done (speculating
    by ``speculation`` with the ``draft`` model if given). ``new_engine(n_slots)``."""
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(args.seed)

    out = sys.stdout
    try:
        if args.batch:
            news, stats = batch_generate(new_engine, draft, ids, params, args.seed, speculation)
            for i, (p, new) in enumerate(zip(ids, news)):
                if len(ids) > 1:
                    out.write(f"=== {i + 1}/{len(ids)}\n")
                out.write(tokenizer.decode([t for t in p + new if t != tokenizer.eot_id]) + "\n")
            if stats is not None:
                print(f"[speculative, batch] {speculation.method} up to "
                      f"{speculation.num_tokens} tokens: acceptance {stats.acceptance_rate:.2f}"
                      f", {stats.tokens_per_target_call:.2f} tokens per verify, "
                      f"{stats.plain_calls} plain steps", file=sys.stderr)
            return 0
        engine = new_engine(1)
        per_token, first = [], []  # seconds per token after the first; prefill + first token
        for i, p in enumerate(ids):
            if len(ids) > 1:
                out.write(f"=== {i + 1}/{len(ids)}\n")
            out.write(tokenizer.decode(p))
            out.flush()
            detok = Detokenizer(tokenizer)
            if spec is None:
                steps = ([tok for _, tok in step] for step in engine.stream([p], params, gen()))
            else:
                steps = spec.stream(p, params, gen())
            start, stamps = time.perf_counter(), []
            for step in steps:
                stamps.append((time.perf_counter(), len(step)))
                for tok in step:
                    if tok in params.stop_tokens:
                        continue
                    out.write(detok.push(tok))
                    out.flush()
            out.write(detok.flush() + "\n")
            out.flush()
            if len(stamps) > 1:
                first.append(stamps[0][0] - start)
                per_token.append((stamps[-1][0] - stamps[0][0])
                                 / sum(n for _, n in stamps[1:]))
        if args.timing and per_token:
            print(f"[timing] {statistics.median(per_token) * 1e3:.2f} ms per decoded token "
                  f"(median of {len(per_token)} prompts: "
                  f"{', '.join(f'{t * 1e3:.2f}' for t in per_token)}); prefill and first "
                  f"token {statistics.median(first) * 1e3:.1f} ms", file=sys.stderr)
        if spec is not None and args.prompt_lookup is not None:
            st = spec.stats
            print(f"[prompt lookup] up to {args.prompt_lookup} tokens: acceptance "
                  f"{st.acceptance_rate:.2f}, {st.tokens_per_target_call:.2f} tokens per "
                  f"verify, {st.plain_calls} plain steps (nothing proposed)", file=sys.stderr)
        elif spec is not None:
            st = spec.stats
            print(f"[speculative] {args.draft_tokens} draft tokens: acceptance "
                  f"{st.acceptance_rate:.2f} (predicted 1 - TV: "
                  f"{st.acceptance_rate_predicted:.2f}), {st.tokens_per_target_call:.2f} tokens "
                  f"per target call (predicted {st.tokens_per_target_call_predicted:.2f})",
                  file=sys.stderr)
    except ValueError as e:  # e.g. a prompt longer than the context
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
