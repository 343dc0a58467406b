"""The allowed values of a schema field, declared beside it (``bounded(128, min=1)``) and checked after
the types: numbers within limits, lists of a length or increasing, strings not empty."""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from core.registry import ConfigError


@dataclass(frozen=True)
class Bounds:
    """Allowed values of a number, or of every number of a list: ``min``/``max`` inclusive, ``above``/
    ``below`` exclusive. For a list also its ``length``, strictly ``increasing`` values, ``unique`` ones;
    for a string ``nonempty``."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    length: int | None = None
    increasing: bool = False
    unique: bool = False
    nonempty: bool = False

    def range(self) -> str:
        """The allowed numbers in words: ``>= 1``, ``in [0, 1)``, ... (empty: any)."""
        low = (
            f"[{self.min:g}" if self.min is not None else f"({self.above:g}" if self.above is not None else ""
        )
        high = (
            f"{self.max:g}]" if self.max is not None else f"{self.below:g})" if self.below is not None else ""
        )
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""

    def describe(self, tp: Any) -> str:
        """What a field of type ``tp`` with these bounds allows, in words."""
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list:
            words = [f"a list of {self.length} values" if self.length is not None else "a list"]
            if self.range():
                words.append(f"each {self.range()}")
            words += [w for w, on in (("increasing", self.increasing), ("no repeats", self.unique)) if on]
            return ", ".join(words)
        if tp is str:
            return "a string, not empty" if self.nonempty else "a string"
        number = int if int in (tp, *args) else float
        text = f"{type_name(number)} {self.range()}".strip()
        return f"{text}, or null" if type(None) in args else text

    def allows(self, x: float) -> bool:
        return not (
            (self.min is not None and x < self.min)
            or (self.max is not None and x > self.max)
            or (self.above is not None and x <= self.above)
            or (self.below is not None and x >= self.below)
        )

    def check(self, value: Any, key: str) -> None:
        """Raise a :class:`ConfigError` for ``key`` unless ``value`` (a checked type) is within bounds."""
        if isinstance(value, str):
            if self.nonempty and not value:
                raise ConfigError(f"{key} must not be empty", key=key)
            return
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                raise ConfigError(f"{key} must be a list of {self.length} values, got {value!r}", key=key)
            for i, item in enumerate(value):
                self.check(item, f"{key}[{i}]")
            if self.increasing and any(b <= a for a, b in itertools.pairwise(value)):
                raise ConfigError(f"{key} must be increasing, got {value!r}", key=key)
            if self.unique and len(set(map(repr, value))) != len(value):
                raise ConfigError(f"{key} must not name a value twice, got {value!r}", key=key)
            return
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not self.allows(value):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"{key} must be {kind} {self.range()}, got {value!r}", key=key)


def limits(**bounds: Any) -> dict[str, Bounds]:
    """Field metadata declaring the :class:`Bounds` that :func:`validate` checks:
    ``field(default_factory=list, metadata=limits(min=0.0, increasing=True))``."""
    return {"bounds": Bounds(**bounds)}


def bounded(default: Any, **bounds: Any) -> Any:
    """A schema field with an immutable default whose values must lie within :class:`Bounds` ``bounds``:
    ``batch_size: int = bounded(128, min=1)``."""
    return field(default=default, metadata=limits(**bounds))


PROBABILITY = {"min": 0.0, "max": 1.0}


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )
