"""Shared command-line handling: ``--config FILE`` plus ``--section.key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from moe.config import Config, ConfigError, load_config


def parse_config(argv: list[str] | None = None, description: str = "",
                 extra: callable = None) -> tuple[Config, argparse.Namespace]:
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
