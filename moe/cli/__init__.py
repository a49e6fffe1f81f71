"""The command-line programs, one module each (train, generate, ablate, bench, count_params,
export_hf, export_gguf, import_hf, upcycle, consolidate, routing_report, batch_dependence,
init_memory), each a ``main(argv=None) -> int`` (the exit status) run by
``scripts/<name>.py`` and by the ``moe-<name>`` console scripts of pyproject.toml; here, what
they share: ``--config FILE`` plus ``--section.key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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
    """``--run`` (required) and ``--checkpoint``: what ``moe.checkpoint.load_model`` loads
    (``args.checkpoint or args.run``) for the inference commands."""
    parser.add_argument("--run", required=True,
                        help="run folder, step folder or consolidated checkpoint file")
    parser.add_argument("--checkpoint", default=None, help="a step folder or consolidated file "
                        "(default: the run's newest good checkpoint)")
