"""Experiment configuration: YAML files with ``_base_`` inheritance, dotted overrides and a typed schema.

A config file is a YAML mapping. ``_base_`` names one file or a list of files (relative to the file that
names them); they are merged in order, then the file's own keys on top. Mappings merge key by key, any other
value (lists included) replaces the earlier one; a section given another ``name`` (``head.name: cosface``
over ``arcface``) starts its ``params`` afresh. Overrides from the command line use dotted paths::

    python train.py --config configs/recipes/arcface.yaml --set optim.lr=0.05 data.root=/x

Values of overrides are parsed as YAML scalars (``0.05`` -> float, ``true`` -> bool, ``[a, b]`` -> list).

The merged mapping is checked against the dataclass schema below: an unknown key is refused with the
closest valid name, a value of the wrong type with the key's dotted path, and every value against the
bounds declared beside its field (``bounded(128, min=1)``: an integer >= 1; probabilities in [0, 1];
numbers finite) and the rules that join keys (:func:`validate`). A key given twice in one YAML mapping is
refused rather than the last one kept. Every error is one line naming the key and where its value was set:
``FILE line N`` or the ``--set`` argument. ``dump_config`` writes the resolved config, which
``load_config`` reads back to an identical object.

The package: ``schema.py`` holds the sections and their keys (where a key is added), ``bounds.py`` the
allowed values declared beside them, ``yamlfile.py`` the reading of files, bases and ``--set`` with where
each value was set, ``checking.py`` the typed build and the checks; this module the entry points.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from core import plugins
from core.config.bounds import PROBABILITY, Bounds, bounded, limits
from core.config.checking import all_keys, check_param, from_dict, validate, value_bounds
from core.config.schema import (
    AugmentConfig,
    Config,
    CustomImportsConfig,
    DataConfig,
    EmaConfig,
    ExperimentConfig,
    HeadConfig,
    LossConfig,
    MiningConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from core.config.yamlfile import (
    BASE_KEY,
    apply_overrides,
    drop_under,
    locate,
    merge_dicts,
    params_restarted,
    parse_overrides,
    parse_overrides_with_sources,
    read_with_origins,
    read_yaml_with_bases,
)
from core.fileio import atomic_write
from core.registry import ConfigError  # one error type for schema and registry-parameter checks

__all__ = [
    "BASE_KEY", "PROBABILITY", "AugmentConfig", "Bounds", "Config", "ConfigError", "CustomImportsConfig",
    "DataConfig", "EmaConfig", "ExperimentConfig", "HeadConfig", "LossConfig", "MiningConfig", "ModelConfig",
    "ObjectiveConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "all_keys", "apply_overrides",
    "bounded", "check_param", "check_part", "config_from_dict", "config_to_dict", "dump_config", "from_dict",
    "limits", "load_config", "merge_dicts", "parse_overrides", "read_yaml_with_bases", "validate",
    "value_bounds",
]  # fmt: skip

# ------------------------------------------------------------------------------------------ public API


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config file (with its bases) plus dotted overrides into a checked :class:`Config`.

    Errors name the key and where its value was set: the ``--set`` argument, or the file and line."""
    merged, origins = read_with_origins(path) if path is not None else ({}, {})
    nested, sources = parse_overrides_with_sources(overrides)
    if plugins.KEY in nested:  # files named relative to the working directory
        nested[plugins.KEY] = plugins.resolve_entries(nested[plugins.KEY], Path.cwd())
    origins = drop_under(origins, params_restarted(merged, nested))
    merged = apply_overrides(merged, nested)
    origins = (
        drop_under(origins, sources) | sources
    )  # an override replaces what the files set at and inside its key
    try:
        merged, origins = _custom_imports_mapping(merged, origins)
        cfg = from_dict(Config, merged)
        validate(cfg)
    except ConfigError as err:
        where = locate(origins, err.key) if err.key else ""
        raise ConfigError(
            f"{where or (path if path is not None else 'config')}: {err}", key=err.key
        ) from None
    cfg._origins = origins
    plugins.import_custom(
        cfg.custom_imports.imports,
        cfg.custom_imports.allow_failed_imports,
        where=lambda i: cfg.origin(f"{plugins.KEY}.imports[{i}]") or str(path or "config"),
    )
    return cfg


def _custom_imports_mapping(
    merged: dict[str, Any], origins: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``custom_imports`` given as a plain list, as the mapping of the schema; its ``imports`` set where the
    list was."""
    if plugins.KEY not in merged:
        return merged, origins
    value = merged[plugins.KEY]
    merged = {**merged, plugins.KEY: plugins.as_mapping(value)}
    if not isinstance(value, Mapping) and plugins.KEY in origins:
        origins = {**origins, f"{plugins.KEY}.imports": origins[plugins.KEY]}
    return merged, origins


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Check a plain mapping (e.g. the config stored in a checkpoint) against the schema."""
    try:
        data = _custom_imports_mapping(dict(data), {})[0] if isinstance(data, Mapping) else data
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}", key=err.key) from None
    return cfg


def check_part(
    cfg: Config, registry: Any, name_key: str, params_key: str | None = None, fixed: tuple[str, ...] = ()
) -> None:
    """Refuse, before anything is built, a part (backbone, head, loss) that ``registry`` does not hold under
    the name at ``name_key``, or params at ``params_key`` that its constructor does not take: a name it
    lacks, a value its annotation refuses. ``fixed``: parameters the caller supplies. The error names the
    key and where its value was set."""
    name = operator.attrgetter(name_key)(cfg)
    try:
        registry.check_name(name, name_key)
        if params_key is not None:
            registry.check_kwargs(name, operator.attrgetter(params_key)(cfg), params_key, fixed)
    except ConfigError as err:
        where = cfg.origin(err.key or name_key)
        raise ConfigError(f"{where}: {err}" if where else str(err), key=err.key) from None


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically; ``load_config`` reads it back identically."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
