"""The command-line programs, one module each (train, generate, ablate, bench, count_params,
export_hf, export_gguf, import_hf, upcycle, consolidate, routing_report, batch_dependence,
init_memory), each a ``main(argv=None) -> int`` (the exit status) run by
``scripts/<name>.py`` and by the ``moe-<name>`` console scripts of pyproject.toml; here, what
they share: ``--config FILE`` plus ``--section.key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from moe.config import Config, ConfigError, load_config


def parse_config(argv: list[str] | None = None, description: str = "",
                 extra: Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> tuple[Config, argparse.Namespace]:
    """Parse known flags (added by ``extra(parser)``), treat the rest as config overrides.

    A bad config exits with status 2 and a one-line ``error: ...`` message.
    """
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Any config key can be set as --section.key=value.")
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    if extra is not None:
        extra(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg, args


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--run``, either enough: what ``moe.checkpoint.load_model`` loads
    for the inference commands (read it with ``model_source(args)``). ``--checkpoint`` is the
    spelling for torchrun, whose own parser takes ``--run`` for its ``--run-path`` ("ambiguous
    option", even as ``--run=DIR``)."""
    parser.add_argument("--checkpoint", default=None,
                        help="run folder (its newest good checkpoint), step folder or "
                             "consolidated checkpoint file")
    parser.add_argument("--run", default=None,
                        help="the same, for one process (torchrun mistakes --run for its "
                             "own --run-path: use --checkpoint there)")


def model_source(args: argparse.Namespace) -> str:
    """The path ``add_model_source``'s flags name; ValueError (one line) when neither is given
    or they name different runs (``--run R --checkpoint C`` is allowed for C inside R)."""
    run, checkpoint = args.run, args.checkpoint
    if run is None and checkpoint is None:
        raise ValueError("give --checkpoint PATH (a run folder, a step folder or a "
                         "consolidated file)")
    if run is not None and checkpoint is not None:
        r, c = Path(run).resolve(), Path(checkpoint).resolve()
        if c != r and r not in c.parents:
            raise ValueError(f"--run {run} and --checkpoint {checkpoint} name different "
                             f"checkpoints: give --checkpoint alone")
    return checkpoint if checkpoint is not None else run



def refuse_across_ranks(args: argparse.Namespace) -> None:
    """ValueError (one line) for what moe-generate / moe-serve run in one process only:
    ``--draft``, ``--prompt-lookup``, ``--image`` and ``--dtype int8``."""
    for flag, given in (("--draft", args.draft), ("--image", getattr(args, "image", None)),
                        ("--prompt-lookup", args.prompt_lookup is not None)):
        if given:
            raise ValueError(f"{flag} runs in one process: drop it, or the --parallel.* "
                             "layout and torchrun")
    if args.dtype == "int8":
        raise ValueError("--dtype int8 runs in one process (its per-channel scales are "
                         "the whole matrix's): use fp32 or bf16 across ranks")


def add_speculation(parser: argparse.ArgumentParser) -> None:
    """``--draft RUN``, ``--draft-tokens N`` and ``--prompt-lookup N``: speculative decoding
    (moe/inference/spec_batch.py) for moe-generate and moe-serve."""
    parser.add_argument("--draft", default=None, metavar="RUN",
                        help="speculative decoding: a draft model's run, step folder or file "
                             "(the target's tokenizer)")
    parser.add_argument("--draft-tokens", type=int, default=4,
                        help="tokens the draft proposes per target call (with --draft)")
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                        help="speculative decoding by prompt lookup: up to N tokens per target "
                             "call")


def speculation_of(args: argparse.Namespace):
    """The ``Speculation`` that --draft / --draft-tokens / --prompt-lookup ask for (None:
    none); ValueError naming the flag for a bad combination or size."""
    from moe.inference.spec_batch import Speculation

    if args.draft is not None and args.prompt_lookup is not None:
        raise ValueError("--draft and --prompt-lookup both propose tokens: choose one")
    flag, spec = ("--draft-tokens", ("draft_model", args.draft_tokens)) if args.draft else \
        ("--prompt-lookup", ("ngram", args.prompt_lookup))
    if args.draft is None and args.prompt_lookup is None:
        return None
    try:
        return Speculation(*spec)
    except ValueError as e:
        raise ValueError(f"{flag} {spec[1]}: {e}") from None


def load_draft(source: str, target, device):
    """The draft model of ``source``; ValueError if its tokenizer differs from the target's
    (``target``: the target's ``moe.checkpoint.load_model`` result)."""
    from pathlib import Path

    from moe.checkpoint import load_model

    draft = load_model(source, device=device)
    if target.tokenizer and draft.tokenizer and \
            Path(target.tokenizer).read_bytes() != Path(draft.tokenizer).read_bytes():
        raise ValueError(f"the draft's tokenizer {draft.tokenizer} differs from the "
                         f"target's {target.tokenizer}")
    return draft.model
