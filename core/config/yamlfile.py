"""Config files as YAML: a loader that reads ``1e-4`` as a number and remembers the line of every key,
``_base_`` inheritance, dotted ``--set`` overrides, and where each value was set (``FILE line N`` or the
``--set`` argument), which every error names."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from core import plugins
from core.registry import ConfigError

BASE_KEY = "_base_"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _yaml_load(text: str, name: str = "<text>") -> tuple[Any, dict[str, int]]:
    """The YAML document in ``text`` and the 1-based line of every mapping key, by dotted path. A key given
    twice in one mapping is refused (``name`` and both lines): YAML itself would keep the last one."""
    loader = _Loader(text)  # a SafeLoader subclass: no arbitrary objects
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _key_lines(node, "", name, lines)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def _key_lines(node: yaml.Node, prefix: str, name: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # `<<: *anchor` copies keys that this mapping may override
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(
                    f"{name} line {line}: duplicate key {dotted} (first at line {first[key]}); "
                    "give each key once"
                )
            first[key] = lines[dotted] = line
            _key_lines(value_node, dotted, name, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _key_lines(item, f"{prefix}[{i}]", name, lines)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int | None, str]:
    """The line (1-based, if known) and a one-line description of a YAML syntax error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        text = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        return (mark.line + 1 if mark is not None else None), " ".join(text.split())
    return None, " ".join(str(exc).split())


# ------------------------------------------------------------------------------------- reading files


def read_yaml_with_bases(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and merge its ``_base_`` files (recursively) beneath its own keys."""
    return read_with_origins(path, _chain)[0]


def read_with_origins(
    path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`read_yaml_with_bases`, and where each dotted key was set (``FILE line N``): the file whose
    value the merge keeps."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {cycle}")
    if not path.is_file():
        where = f" (named in {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw, lines = _yaml_load(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc)
        raise ConfigError(f"{path}{f' line {line}' if line else ''}: invalid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")

    bases = raw.pop(BASE_KEY, [])
    if plugins.KEY in raw:  # files named relative to this file
        raw[plugins.KEY] = plugins.resolve_entries(raw[plugins.KEY], path.parent)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_data, base_origins = read_with_origins(path.parent / base, (*_chain, path))
        origins = drop_under(origins, params_restarted(merged, base_data)) | base_origins
        merged = merge_dicts(merged, base_data)
    origins = drop_under(origins, params_restarted(merged, raw))
    origins.update({key: f"{path} line {line}" for key, line in lines.items() if key.split(".")[0] in raw})
    return merge_dicts(merged, raw), origins


def params_restarted(base: Mapping[str, Any], top: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``params`` sections that merging ``top`` over ``base`` starts afresh (see :func:`_start_from`)."""
    renamed = isinstance(top.get("name"), str) and top["name"] != base.get("name")
    out = [f"{prefix}params"] if renamed and isinstance(base.get("params"), Mapping) else []
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out += params_restarted(base[key], value, f"{prefix}{key}.")
    return out


def drop_under(origins: Mapping[str, str], sections: Iterable[str]) -> dict[str, str]:
    """``origins`` without the keys at or inside ``sections``."""
    sections = list(sections)
    return {k: v for k, v in origins.items() if not any(_under(k, s) for s in sections)}


def _start_from(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` as the start of a merge with ``top``. A section that ``top`` renames (``head.name: cosface``
    over ``arcface``) drops the old ``params``: constructor arguments belong to the part they were set for."""
    out = dict(base)
    renamed = isinstance(top.get("name"), str) and top["name"] != base.get("name")
    if renamed and isinstance(base.get("params"), Mapping):
        out["params"] = {}
    return out


def merge_dicts(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key; any other value in ``top`` replaces the one in ``base``."""
    out = _start_from(base, top)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set each overridden key to its value: ``--set head.params={}`` empties the mapping (a merge would
    keep what was there), while ``--set head.params.m=0.4`` changes one key of it."""
    out = _start_from(base, overrides)
    for key, value in overrides.items():
        if isinstance(value, _Given):  # a mapping written as the value: it replaces
            out[key] = dict(value)
        elif isinstance(value, dict) and isinstance(out.get(key), Mapping):
            out[key] = apply_overrides(out[key], value)
        else:
            out[key] = value
    return out


class _Given(dict):
    """A mapping that an override gives as its value (``k={a: 1}``), as opposed to the path's sections."""


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "data.root=/x"]`` -> nested dict ``{"optim": {"lr": 0.05}, ...}``."""
    return parse_overrides_with_sources(items)[0]


def parse_overrides_with_sources(items: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The nested overrides and, for each overridden dotted key, the argument that set it (``--set k=v``);
    a later override of a key wins, as on any command line."""
    nested: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for item in items:
        where = f"--set {item}"
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{where}: not of the form dotted.key=value")
        try:
            value = _yaml_load(text, where)[0] if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: the value is not valid YAML: {_yaml_problem(exc)[1]}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: conflicts with an earlier --set of {part}")
            node = child
        node[parts[-1]] = _Given(value) if isinstance(value, dict) else value
        sources = drop_under(sources, [key]) | {key: where}  # replaced, with what it held
    return nested, sources


def _under(key: str, section: str) -> bool:
    """``key`` is ``section`` or lies inside it (``head.params.m`` in ``head.params``, ``x[0]`` in ``x``)."""
    return key == section or key.startswith(section + ".") or key.startswith(section + "[")


def locate(origins: Mapping[str, str], key: str) -> str:
    """Where the value of ``key`` was set: the one source of everything inside it (an override of
    ``head.params.m`` for ``head.params``), else its own entry, else that of the list or ``--set`` mapping
    that holds it; ``""`` when unknown (a default) or set in several places by ``--set``."""
    inside = {where for k, where in origins.items() if _under(k, key) and k != key}
    if len(inside) == 1:
        return inside.pop()
    if any(where.startswith("--set ") for where in inside):
        return ""  # set in several places, not all in the file that opened the section
    if key in origins:
        return origins[key]
    path = key  # an item of a list, or a key inside a mapping given whole by --set (head.params={s: 16})
    while re.search(r"[.\[]", path):
        item = path.endswith("]")
        path = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", path)
        if path in origins and (item or origins[path].startswith("--set ")):
            return origins[path]
    return ""
