"""Loading a config: defaults < YAML file < ``--section.key=value`` overrides; a saved run's
keys upgraded to today's (``upgrade_saved``)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from moe.config.fields import REPLACED, ConfigError, nested_type, set_field
from moe.config.root import Config
from moe.config.train import TrainConfig


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``3e-3`` (1.1 wants ``3.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from an optional YAML file and ``--section.key=value`` strings."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        raw = loaded
        for dotted, why in REPLACED.items():
            section, key = dotted.split(".")
            if isinstance(raw.get(section), dict) and key in raw[section]:
                raise ConfigError(f"config file {path}: {dotted} was {why}")
    cfg = from_dict(raw)
    apply_overrides(cfg, overrides or [])
    return cfg.validate()




def upgrade_saved(raw: dict) -> dict:
    """A saved config (a run folder's ``config.yaml``, a checkpoint's) in today's keys, the same
    run: ``train.eval_batches`` x ``train.micro_batch_size`` windows become
    ``data.val_windows`` (exactly the windows evaluated then); ``parallel.zero1``
    becomes ``parallel.dp_shard``."""
    parallel = raw.get("parallel")
    if isinstance(parallel, dict) and "zero1" in parallel:
        parallel = dict(parallel)
        zero1 = parallel.pop("zero1")
        parallel.setdefault("dp_shard", "zero1" if zero1 else "none")
        raw = {**raw, "parallel": parallel}
    train = dict(raw.get("train") or {})
    if "eval_batches" not in train:
        return raw
    micro = train.get("micro_batch_size", TrainConfig.micro_batch_size)
    data = dict(raw.get("data") or {})
    data.setdefault("val_windows", train.pop("eval_batches") * micro)
    return {**raw, "train": train, "data": data}


def saved_differences(saved: dict, cfg: Config, keys: list[str]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, value now)`` for each dotted ``key`` (``"model.d_model"``, or a whole
    section ``"model"``) whose value in a saved run's config differs from ``cfg``'s. A key the
    saved config lacks (added to the code since) counts as its default. The one comparison
    behind resuming (moe/train/loop.py) and ``train.init_from`` (moe/train/init_from.py)."""
    now, default, saved = cfg.to_dict(), Config().to_dict(), upgrade_saved(saved)
    out = []
    for key in keys:
        section, _, name = key.partition(".")
        for k in [name] if name else list(now[section]):
            old = (saved.get(section) or {}).get(k, default[section][k])
            if old != now[section][k]:
                out.append((f"{section}.{k}", old, now[section][k]))
    return out


def from_dict(raw: dict) -> Config:
    """A Config from a mapping of sections (a saved run's keys are upgraded first)."""
    raw = upgrade_saved(raw)
    cfg = Config()
    for section, values in raw.items():
        if section not in _sections():
            raise ConfigError(f"unknown config section '{section}': use one of "
                              f"{', '.join(_sections())}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    return cfg


def parse_override(arg: str) -> tuple[str, Any]:
    """``--model.top_k=2`` -> ("model.top_k", 2); values are parsed as YAML scalars."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"bad override '{arg}': write --section.key=value")
    key, text = arg[2:].split("=", 1)
    try:
        return key, _yaml_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override --{key}: {text!r} is not a YAML value "
                          f"({getattr(e, 'problem', None) or 'parse error'}): quote it") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: "line 3, column 7: mapping values are not allowed here"."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for arg in overrides:
        key, value = parse_override(arg)
        set_key(cfg, key, value)
    return cfg


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """``section.key`` = value; ``section.key.sub`` sets one field of a nested mapping key
    (``model.rope_scaling.type=yarn``), creating it with its defaults when it is null."""
    parts = dotted.split(".")
    if len(parts) not in (2, 3) or parts[0] not in _sections():
        raise ConfigError(f"unknown config key '{dotted}': keys look like section.key with "
                          f"section one of {', '.join(_sections())}")
    section = getattr(cfg, parts[0])
    if len(parts) == 2:
        set_field(section, parts[0], parts[1], value)
        return
    hints = typing.get_type_hints(type(section))
    nested = nested_type(hints[parts[1]]) if parts[1] in hints else None
    if nested is None:
        raise ConfigError(f"unknown config key '{dotted}': {parts[0]}.{parts[1]} is not a "
                          "mapping key (keys look like section.key)")
    if getattr(section, parts[1]) is None:
        setattr(section, parts[1], nested())
    set_field(getattr(section, parts[1]), f"{parts[0]}.{parts[1]}", parts[2], value)








def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]
