"""What every config section shares: the one-line error, value checks that name the key,
and the coercion of YAML / command-line values to a key's type (nested mappings included).
A section is a dataclass with a ``SECTION`` name (``model``, ``model.rope_scaling``, ...)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad key or value in a config; the message is one line naming the key."""


# Keys that no longer exist: a YAML file or override naming one gets this line; a run folder
# saved with one is read through ``upgrade_saved`` (the same meaning in today's keys).
REPLACED = {"train.eval_batches": "replaced by data.val_windows, a number of windows (the "
                                   "former set was eval_batches x train.micro_batch_size)",
            "parallel.zero1": "replaced by parallel.dp_shard (none | zero1 | fsdp): "
                              "zero1=true is dp_shard=zero1"}


def set_field(obj: Any, prefix: str, name: str, value: Any) -> None:
    keys = {f.name for f in dataclasses.fields(obj)}  # not the SECTION class attribute
    hints = {k: v for k, v in typing.get_type_hints(type(obj)).items() if k in keys}
    if f"{prefix}.{name}" in REPLACED:
        raise ConfigError(f"config key '{prefix}.{name}' was {REPLACED[f'{prefix}.{name}']}")
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"unknown config key '{prefix}.{name}'; {prefix} keys are: {known}")
    setattr(obj, name, coerce(f"{prefix}.{name}", value, hints[name]))


def nested_type(hint: Any) -> type | None:
    """The dataclass of a nested mapping key (``Optional[RopeScalingConfig]``), else None."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. float | str: the first type that takes the value
            for option in options:
                try:
                    return coerce(key, value, option)
                except ConfigError:
                    pass
            names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
            raise ConfigError(f"config key '{key}' expects {names}, got {value!r}")
        (hint,) = options
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return list(value)
    elif dataclasses.is_dataclass(hint):  # a nested mapping: each key checked as a config key
        if isinstance(value, hint):
            return dataclasses.replace(value)
        if isinstance(value, dict):
            obj = hint()
            for k, v in value.items():
                set_field(obj, key, str(k), v)
            return obj
        fields = ", ".join(f.name for f in dataclasses.fields(hint))
        raise ConfigError(f"config key '{key}' expects a mapping of {fields} (or null), "
                          f"got {value!r}")
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key '{key}' expects {name}, got {value!r}")


def positive(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if not v > 0:
            raise ConfigError(f"{obj.SECTION}.{k}={v} must be > 0")


def nonnegative(obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if v < 0:
            raise ConfigError(f"{obj.SECTION}.{k}={v} must be >= 0")


def choice(obj: Any, key: str, options: tuple[str, ...]) -> None:
    v = getattr(obj, key)
    if v not in options:
        raise ConfigError(f"{obj.SECTION}.{key}={v!r} must be one of {', '.join(options)}")
