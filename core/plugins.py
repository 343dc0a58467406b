"""User code without forking: the ``custom_imports`` of a config, imported before anything is built.

A config names Python files (relative to the config file that names them, or absolute) or importable module
names, MMEngine's convention, in either form::

    custom_imports: [my_parts.py, mypkg.heads]
    custom_imports: {imports: [my_parts.py], allow_failed_imports: false}

Importing them runs their registrations (``@BACKBONES.register("my_net")``, ``@HEADS.register(...)``,
``@LOSSES.register(...)``), so the parts are usable by name from the YAML. An entry ending in ``.py`` or
holding a ``/`` is a file; anything else a module name, imported with :func:`importlib.import_module` (it
must be on ``sys.path``, e.g. through ``PYTHONPATH``).

Each file is imported once per process, keyed by its resolved path: a second config naming it (a resumed
run, a checkpoint being evaluated) finds it imported and registers nothing twice. A file that does not import
(missing, a syntax error, an exception, a name already registered) is one line naming it and the reason, with
the file's own line where there is one, and leaves no name of its registered; ``allow_failed_imports: true``
turns that line into a warning.

This module imports the user's files and modules only; it knows no model or dataset, and of the registries
only what names they hold (to forget those of a file that failed part-way).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from core.registry import ConfigError, DuplicateNameError, forget_names_since, registered_names

KEY = "custom_imports"
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class CustomImportError(ImportError):
    """An entry of ``custom_imports`` could not be imported; the message names it and says why."""


def is_file(entry: str) -> bool:
    """Whether ``entry`` names a file (``my_parts.py``, ``parts/x``), not a module (``mypkg.heads``)."""
    return entry.endswith(".py") or "/" in entry or os.sep in entry or not _MODULE_NAME.match(entry)


def resolve_entries(value: Any, base_dir: str | os.PathLike[str]) -> Any:
    """``value`` (either form of ``custom_imports``) with every relative file made absolute against
    ``base_dir`` (the folder of the config file that names it, or the working directory for ``--set``).
    Module names and values of any other shape are returned as they are, for the schema to judge."""

    def absolute(entry: Any) -> Any:
        if not isinstance(entry, str) or not entry or not is_file(entry):
            return entry
        return os.path.normpath(Path(base_dir, os.path.expanduser(entry)))

    if isinstance(value, list):
        return [absolute(entry) for entry in value]
    if isinstance(value, Mapping) and isinstance(value.get("imports"), list):
        return type(value)({**value, "imports": [absolute(entry) for entry in value["imports"]]})
    return value


def as_mapping(value: Any) -> dict[str, Any]:
    """Either form of ``custom_imports`` as the mapping the schema holds (``{imports: [...]}``); ``null``
    names nothing. Another shape is a :class:`ConfigError` for the key."""
    if value is None:
        return {"imports": []}
    if isinstance(value, list):
        return {"imports": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(
        f"{KEY} must be a list of .py files or module names, or a mapping {{imports: [...], "
        f"allow_failed_imports: false}}, got {value!r} ({type(value).__name__})",
        key=KEY,
    )


def import_entry(entry: str) -> ModuleType:
    """Import one ``custom_imports`` entry (an absolute file, or a module name) once per process. An entry
    that fails part-way registers nothing: the names it registered before failing are forgotten, so
    neither a later name nor a retry meets a half-imported part. Names registered by modules it imported
    that did import (the framework's, a helper of the user's) stay, as those modules stay imported."""
    before = registered_names()
    try:
        return _import_file(Path(entry)) if is_file(entry) else _import_module(entry)
    except CustomImportError:
        forget_names_since(before, lambda factory: getattr(factory, "__module__", None) not in sys.modules)
        raise


def import_custom(
    imports: Sequence[str],
    allow_failed: bool = False,
    where: Callable[[int], str] | None = None,
    skipped: str = "skipped: allow_failed_imports is true",
) -> list[ModuleType]:
    """Import every entry of ``imports`` in order; the modules imported. A failure raises a
    :class:`ConfigError` of one line, prefixed by ``where(i)`` (where entry ``i`` was set), or, with
    ``allow_failed``, warns that line (with ``skipped`` after it) and goes on."""
    modules = []
    for i, entry in enumerate(imports):
        try:
            modules.append(import_entry(entry))
        except CustomImportError as err:
            place = where(i) if where is not None else ""
            message = f"{place}: {KEY}: {err}" if place else f"{KEY}: {err}"
            if not allow_failed:
                raise ConfigError(message, key=f"{KEY}.imports[{i}]") from None
            warnings.warn(f"{message} ({skipped})", stacklevel=2)
    return modules


def import_checkpoint_imports(config: Any, source: str | os.PathLike[str]) -> list[ModuleType]:
    """Import the ``custom_imports`` of a checkpoint's saved config (``state["config"]``), so that a part of
    the user's that the checkpoint names (its backbone) builds by name. A checkpoint without them imports
    nothing. An entry that no longer imports (the file moved) is a warning naming the checkpoint, not an
    error: the checkpoint's parts may all be built-in; a missing one is then refused by name."""
    section = config.get(KEY) if isinstance(config, Mapping) else None
    try:
        spec = as_mapping(section)
    except ConfigError:
        warnings.warn(
            f"{source}: its config's {KEY} is not a list of files or modules; nothing imported", stacklevel=2
        )
        return []
    imports = spec.get("imports") or []
    if not isinstance(imports, list):
        return []
    return import_custom(
        [entry for entry in imports if isinstance(entry, str)],
        allow_failed=True,
        where=lambda _: str(source),
        skipped="skipped: the parts it registers cannot be built",
    )


# ------------------------------------------------------------------------------------------ importing


def _module_name(path: Path) -> str:
    """A ``sys.modules`` name of its own for the file at resolved ``path``."""
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"_custom_import_{stem}_{digest}"


def _import_file(path: Path) -> ModuleType:
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        resolved = path.resolve()
    except OSError as err:
        raise CustomImportError(f"{path}: {err.strerror or err}") from None
    name = _module_name(resolved)
    if name in sys.modules:
        return sys.modules[name]
    if not resolved.exists():
        raise CustomImportError(f"{path}: no such file")
    if resolved.is_dir():
        raise CustomImportError(f"{path}: a folder; name a .py file, or the package by its module name")
    if resolved.suffix != ".py":
        raise CustomImportError(f"{path}: not a Python file (.py)")
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise CustomImportError(f"{path}: not importable as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise CustomImportError(_failure(str(path), err, lambda f: f == str(resolved))) from None
    return module


def _import_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise CustomImportError(
                f"{name}: no module of that name on the Python path (sys.path, PYTHONPATH); "
                "name a file with its .py suffix"
            ) from None
        raise CustomImportError(_failure(name, err, _in_module(name))) from None
    except Exception as err:
        raise CustomImportError(_failure(name, err, _in_module(name))) from None


def _in_module(name: str) -> Callable[[str], bool]:
    tail = name.replace(".", "/")
    return lambda f: Path(f).as_posix().endswith((f"{tail}.py", f"{tail}/__init__.py"))


def _failure(entry: str, err: Exception, own: Callable[[str], bool]) -> str:
    """``entry``, the line of its own code that failed (when one did) and the reason, in one line."""
    reason = " ".join(str(err).split())
    if isinstance(err, SyntaxError):
        where = f" line {err.lineno}" if err.lineno else ""
        if err.filename and own(err.filename):
            return f"{entry}{where}: SyntaxError: {err.msg}"
        return f"{entry}: SyntaxError in {err.filename}{where}: {err.msg}"
    frames = traceback.extract_tb(err.__traceback__)
    mine = [frame for frame in frames if own(frame.filename)]
    line = f" line {mine[-1].lineno}" if mine else ""
    text = f"{type(err).__name__}: {reason}"
    if isinstance(err, DuplicateNameError):
        text = f"{reason}; register yours under another name"
    return f"{entry}{line}: {text}"
