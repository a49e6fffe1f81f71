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
