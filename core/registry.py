"""One small registry helper used by every family of buildable parts (backbones, heads, losses, ...).

Parts register themselves with a decorator; configs name them by string::

    BACKBONES = Registry("backbone")

    @BACKBONES.register("r50")
    def iresnet50(**kw): ...

    BACKBONES.build("r50", embedding_size=512)
"""

from __future__ import annotations

import difflib
import inspect
import typing
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names where. ``key``: the dotted config key at
    fault, when there is one, so that a caller can add where its value was set."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DuplicateNameError(ValueError):
    """Raised when a name is registered twice for different parts (e.g. a user's part named like a built-in
    one); the message names the part that holds the name."""


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


_REGISTRIES: weakref.WeakSet[Registry] = weakref.WeakSet()  # every registry, for :func:`registered_names`


class Registry:
    """A mapping from names to factories (classes or functions) of one kind of part."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        _REGISTRIES.add(self)

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        """Decorator registering a factory under ``name`` (default: its ``__name__``) and aliases."""

        def decorator(factory: T) -> T:
            for key in (name or factory.__name__, *aliases):
                held = self._factories.get(key)
                if held is not None and held is not factory:
                    owner = f"{getattr(held, '__module__', '?')}.{getattr(held, '__name__', held)}"
                    raise DuplicateNameError(f"{self.kind} {key!r} is already registered (by {owner})")
                self._factories[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} valid names: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def check_name(self, name: str, where: str) -> None:
        """Refuse a name that is not registered, naming the config key ``where`` and the closest name."""
        try:
            self.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"{where}: {err}", key=where) from None

    def check_kwargs(
        self, name: str, kwargs: dict[str, Any], where: str, fixed: tuple[str, ...] = ()
    ) -> None:
        """Refuse keyword arguments the factory of ``name`` does not take, naming the config key ``where``
        and the closest parameter, and values its annotations refuse (``m: float`` and ``m=abc``), by the
        config schema's rules. ``fixed``: parameters the caller supplies itself (not configurable)."""
        from core.config import check_param  # core.config imports this module

        factory = self.get(name)
        params = inspect.signature(factory).parameters
        for key in kwargs:
            if key in fixed:
                raise ConfigError(
                    f"{where}.{key} is set from the data and the model, not in the config",
                    key=f"{where}.{key}",
                )
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            accepted = [
                p for p in params if p not in fixed and params[p].kind is not inspect.Parameter.VAR_POSITIONAL
            ]
            for key in kwargs:
                if key not in accepted:
                    close = difflib.get_close_matches(key, accepted, n=1)
                    hint = f"; did you mean {where}.{close[0]}?" if close else ""
                    takes = ", ".join(accepted) or "nothing"
                    raise ConfigError(
                        f"unknown key {where}.{key}: {self.kind} {name!r} takes {takes}{hint}",
                        key=f"{where}.{key}",
                    )
        hints = _annotations(factory)
        for key, value in kwargs.items():
            if key in hints:
                check_param(value, hints[key], f"{where}.{key}")

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __len__(self) -> int:
        return len(self._factories)


def _annotations(factory: Callable[..., Any]) -> dict[str, Any]:
    """The parameter annotations of a function or of a class's ``__init__`` (none if they do not resolve)."""
    try:
        return typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # an annotation naming something only a type checker imports: no type checks
        return {}


def registered_names() -> dict[Registry, set[str]]:
    """The names every registry holds now (:func:`forget_names_since` takes it)."""
    return {registry: set(registry._factories) for registry in list(_REGISTRIES)}


def forget_names_since(
    before: dict[Registry, set[str]], forget: Callable[[Any], bool] = lambda factory: True
) -> list[str]:
    """Unregister every name registered since ``before`` (:func:`registered_names`) whose factory ``forget``
    accepts, e.g. those of a user's file that failed halfway through importing; returns them as
    "kind 'name'"."""
    forgotten = []
    for registry in list(_REGISTRIES):
        for key in set(registry._factories) - before.get(registry, set()):
            if forget(registry._factories[key]):
                del registry._factories[key]
                forgotten.append(f"{registry.kind} {key!r}")
    return sorted(forgotten)
