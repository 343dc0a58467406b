"""Building the schema from a merged mapping: unknown keys refused with the closest valid name, values of
the wrong type with their dotted key, then the bounds of every field and the rules that join keys."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from core.config.bounds import type_name
from core.config.schema import Config
from core.registry import ConfigError

# -------------------------------------------------------------------------------------- type checking


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type with a
    :class:`ConfigError` whose ``key`` is the dotted path at fault."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'top level'} must be a mapping, got {type(data).__name__}", key=path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{path}.{key}" if path else str(key)
            raise ConfigError(_unknown_key_message(cls, path, str(key)), key=full)
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], key_path)
    return cls(**kwargs)


def _unknown_key_message(cls: type, path: str, key: str) -> str:
    full = f"{path}.{key}" if path else key
    here = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        suggestion = f"{path}.{close[0]}" if path else close[0]
    else:  # maybe the key belongs to another section: compare against every dotted path
        close = difflib.get_close_matches(full, all_keys(Config), n=1, cutoff=0.6)
        suggestion = close[0] if close else ""
    hint = f"; did you mean {suggestion}?" if suggestion else f"; valid keys here: {', '.join(here)}"
    return f"unknown key {full}{hint}"


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key path of a dataclass schema, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], dotted + "."))
    return keys


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{path} must be {expected}, got {value!r} ({type(value).__name__})", key=path)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue  # try the next member of the union
        raise wrong(" or ".join(type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong(f"a list of {type_name(args[0])}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        if not math.isfinite(value):
            raise wrong("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _schema_type(tp: Any) -> bool:
    """``tp`` is made of the types the schema checks (numbers, strings, lists, Literal, Optional, ...)."""
    if tp is Any or tp in (bool, int, float, str, type(None)):
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, list, dict):
        return all(_schema_type(a) for a in typing.get_args(tp))
    return False


def check_param(value: Any, annotation: Any, key: str) -> None:
    """Refuse ``value`` for a constructor parameter annotated ``annotation`` by the schema's rules (an
    integer is a number, numbers are finite), raising a :class:`ConfigError` for ``key``. An annotation
    beyond the schema's types (a tensor, a module) accepts any value."""
    if _schema_type(annotation):
        _coerce(value, annotation, key)


# ---------------------------------------------------------------------------------------- validation


def _relations(cfg: Config) -> Iterable[tuple[str, str]]:
    """Rules that join keys: (the key at fault, what is wrong) for each one ``cfg`` breaks."""
    if cfg.schedule.min_lr > cfg.optim.lr:
        yield (
            "schedule.min_lr",
            (
                f"schedule.min_lr must be <= optim.lr {cfg.optim.lr:g} (the floor the schedule decays to), "
                f"got {cfg.schedule.min_lr:g}"
            ),
        )
    if cfg.schedule.warmup_epochs >= cfg.train.epochs:
        yield (
            "schedule.warmup_epochs",
            (
                f"schedule.warmup_epochs must be < train.epochs {cfg.train.epochs} (the warmup would be the "
                f"whole run), got {cfg.schedule.warmup_epochs:g}"
            ),
        )
    if cfg.train.ema.select_best == "ema" and not cfg.train.ema.enabled:
        yield (
            "train.ema.select_best",
            "train.ema.select_best ema needs train.ema.enabled: true (no average to validate)",
        )
    if cfg.head.name == "none" and cfg.head.params:
        yield (
            "head.params",
            f"head.params must be empty with head.name none (no head to take them), got {cfg.head.params}",
        )


def validate(cfg: Config) -> None:
    """Check every value against the :class:`Bounds` declared beside its field, then the rules that join
    keys; raise a :class:`ConfigError` naming the first key at fault and what it allows."""
    _check_bounds(cfg, "")
    for key, problem in _relations(cfg):
        raise ConfigError(problem, key=key)


def _check_bounds(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_bounds(value, f"{prefix}{f.name}.")
        elif "bounds" in f.metadata and value is not None:
            f.metadata["bounds"].check(value, f"{prefix}{f.name}")


def value_bounds(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """What the :class:`Bounds` of each bounded key allow, in words (the table in README_TRAIN.md)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= value_bounds(tp, key + ".")
        elif "bounds" in f.metadata:
            out[key] = f.metadata["bounds"].describe(tp)
    return out
