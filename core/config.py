"""Experiment configuration: YAML files with ``_base_`` inheritance, dotted overrides and a typed schema.

A config file is a YAML mapping. ``_base_`` names one file or a list of files (relative to the file that
names them); they are merged in order, then the file's own keys on top. Mappings merge key by key, any other
value (lists included) replaces the earlier one; a section given another ``name`` (``head.name: cosface``
over ``arcface``) starts its ``params`` afresh. Overrides from the command line use dotted paths::

    python train.py --config configs/ms1mv2_r50_arcface.yaml --set optim.lr=0.05 data.root=/x

Values of overrides are parsed as YAML scalars (``0.05`` -> float, ``true`` -> bool, ``[a, b]`` -> list).

The merged mapping is checked against the dataclass schema below: an unknown key is refused with the
closest valid name, a value of the wrong type with the key's dotted path. ``dump_config`` writes the resolved
config, which ``load_config`` reads back to an identical object.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from core.fileio import atomic_write
from core.registry import ConfigError  # one error type for schema and registry-parameter checks

BASE_KEY = "_base_"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


# ----------------------------------------------------------------------------------------------- schema
# Defaults follow insightface arcface_torch (MS1MV2, r50, ArcFace, SGD) unless a comment says otherwise.


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 2048


@dataclass
class AugmentConfig:
    """Probability of each augmentation (docs/methods.md §1.4). arcface_torch: flip only; AdaFace: 0.2 for
    the rest."""

    flip: float = 0.5
    crop: float = 0.0
    low_res: float = 0.0
    photometric: float = 0.0
    jitter: float = 0.0
    # Synthetic face mask on the lower face (data.masks), drawn before the other augmentations: its
    # probability, the types drawn uniformly (surgical, n95, cloth, overlay) and, for ``overlay``, the folder
    # of the photographed masks (mask_<colour>.jpg, as in insightface's package data).
    mask: float = 0.0
    mask_types: list[str] = field(default_factory=lambda: ["surgical", "n95", "cloth"])
    mask_overlays: str = ""


@dataclass
class DataConfig:
    # RecordIO: a .rec file, its prefix (x for x.rec/x.idx) or a folder holding train.rec/train.idx;
    # folder: root/<identity>/<img>. ``auto`` takes a RecordIO when root names one, else the folder.
    root: str = ""
    format: Literal["auto", "rec", "folder"] = "auto"
    # Colour order the network sees; a checkpoint records it (insightface rgb, AdaFace bgr).
    color: Literal["rgb", "bgr"] = "rgb"
    image_size: int = 112
    batch_size: int = 128  # per process
    num_workers: int = 2
    # Read from the data when left empty; a value given here is checked against the data.
    num_classes: int | None = None
    num_images: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Batch order: ``random`` (every image once per epoch, shuffled) or ``pk`` (docs/methods.md §3.10:
    # every micro-batch holds batch_size / pk_k identities x pk_k images, each identity once per epoch,
    # its images repeated when it has fewer than pk_k).
    sampler: Literal["random", "pk"] = "random"
    pk_k: int = 4
    # A training image that cannot be read or decoded, or is not image_size x image_size: ``stop`` ends the
    # run with one line naming it; ``skip`` trains on another image of its identity in its place and counts
    # it (train.log), stopping once more than ``max_bad_records`` distinct records have failed.
    bad_records: Literal["stop", "skip"] = "stop"
    max_bad_records: int = 100
    # Verification .bin sets evaluated during training, looked up in val_root.
    val_root: str = ""
    val_targets: list[str] = field(default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"])


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    grad_checkpoint: bool = False
    channels_last: bool = False
    compile: bool = False
    # Side of the network's input; empty = data.image_size. Faces are stored and augmented at
    # data.image_size and resized to this on the device (a smaller input trains faster on CPUs).
    input_size: int | None = None
    # Initial backbone weights from a checkpoint of this framework (same arch, embedding size, input size
    # and colour); empty: random initialisation.
    pretrained: str = ""
    # Keep the backbone as loaded (no gradient, BN and dropout in inference mode), e.g. for ProbFace.
    freeze_backbone: bool = False
    # ProbFace uncertainty module on the backbone's last feature map (docs/methods.md §3.11):
    # none | scalar | per_dim.
    uncertainty: Literal["none", "scalar", "per_dim"] = "none"
    # Momentum of its BatchNorms (PyTorch's convention, the batch's share): ProbFace's 0.005 (TensorFlow
    # decay 0.995) suits its 12,000 steps; a run of a few hundred steps needs a larger one, e.g. 0.1.
    uncertainty_bn_momentum: float = 0.005
    # DDP: static graph (a fixed set of used parameters), gradient bucket size, fp16 gradient all-reduce.
    ddp_static_graph: bool = True
    ddp_bucket_mb: int = 25
    ddp_fp16_grads: bool = False


@dataclass
class HeadConfig:
    """Margin head by registry name. ``params`` go to its constructor (checked against its signature when
    the head is built), so a head's own defaults apply: CosFace m 0.4, ArcFace m 0.5, AdaFace m 0.4, ...
    ``none``: no classifier; the loss is computed on the embeddings (``triplet``, ``probface``)."""

    name: str = "arcface"
    params: dict[str, Any] = field(default_factory=dict)
    # Partial FC: fraction of negative class centres sampled per step (1.0 = all).
    sample_rate: float = 1.0
    # Partial FC inter-class filtering (arcface_torch): non-target cosines above this are zeroed as likely
    # label-noise duplicates of the sample's identity; 0 = off (arcface_torch's default; 0.4 on noisy data).
    interclass_filtering_threshold: float = 0.0


@dataclass
class LossConfig:
    """Loss on the per-sample cross-entropy of the head's logits (cross_entropy, focal, frabsm_weight), or
    with ``head.name: none`` on the embeddings (triplet: ``params`` margin, mining; probface).
    ``params`` go to its constructor; ``class_weights: inverse_log_frequency`` weights classes by
    1 / log(1 + images of the class), computed from the data."""

    name: str = "cross_entropy"
    params: dict[str, Any] = field(default_factory=dict)
    class_weights: Literal["none", "inverse_log_frequency"] = "none"


@dataclass
class MiningConfig:
    """Per-image difficulty scores (docs/methods.md §3.8): an EMA of each image's target cosine, identical on
    every rank, saved with checkpoints (the closeness-diversity method's stage 1 tracks them for
    stage 2)."""

    difficulty: bool = False
    momentum: float = 0.9
    # Closeness-diversity stage 2: every cd_interval steps (0: never) a mined batch of cd_classes classes
    # (over all ranks) x (cd_easy easy + cd_hard hard images) adds W_C closeness + W_D diversity, the
    # prototypes being the centres of the classes' cd_negatives hardest negative classes.
    cd_interval: int = 0
    cd_classes: int = 64
    cd_easy: int = 7
    cd_hard: int = 1
    cd_negatives: int = 500
    cd_weight_closeness: float = 0.5
    cd_weight_diversity: float = 1.0
    cd_percentile: float = 0.2
    cd_scale: float = 64.0
    # Whose top negatives make the prototypes: the last sample of each selected class in the rank's batch
    # (the method's released code) or all of its samples (more prototypes when a class repeats).
    cd_prototypes: Literal["last", "all"] = "last"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # for a global batch of 1024 (insightface); scale linearly with the batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # Weight decay of BN parameters and biases (AdamW recipes usually use 0).
    no_decay_bn_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    grad_accum: int = 1


@dataclass
class ScheduleConfig:
    name: Literal["polynomial", "multistep", "cosine"] = "polynomial"
    warmup_epochs: float = 0.0
    power: float = 2.0  # polynomial decay exponent (insightface PolyScheduler)
    milestones: list[float] = field(default_factory=list)  # epochs, multistep only
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 20
    log_every: int = 50  # steps between log lines / TensorBoard scalars
    val_every: int = 2000  # steps between validations (0: only at the end)
    val_batch_size: int = 256
    save_every: int = 2000  # steps between checkpoints, 0: none (a final one is always written)
    keep_last: int = 3
    # Validation result that picks best.pt: a .bin name (``lfw``), or ``mean`` over val_targets.
    best_metric: str = "mean"
    # A non-finite loss skips the step; this many in a row abort the run.
    max_bad_steps: int = 5
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); the schedule is unchanged


@dataclass
class Config:
    # Checkpoints, config.yaml, train.log and TensorBoard files of the run go here.
    output_dir: str = "work_dirs/default"
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------- reading files


def read_yaml_with_bases(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and merge its ``_base_`` files (recursively) beneath its own keys."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {cycle}")
    if not path.is_file():
        where = f" (named in {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")

    bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_dicts(merged, read_yaml_with_bases(path.parent / base, (*_chain, path)))
    return merge_dicts(merged, raw)


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
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = _yaml_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = _Given(value) if isinstance(value, dict) else value
    return nested


# -------------------------------------------------------------------------------------- type checking


def from_dict(cls: type, data: Mapping[str, Any], path: str = "", source: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: {_unknown_key_message(cls, path, str(key))}")
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], key_path, source)
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


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {path} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        return from_dict(tp, value, path, source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, path, source)
            except ConfigError:
                continue  # try the next member of the union
        raise wrong(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong(f"a list of {_type_name(args[0])}")
        return [_coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        return {str(k): _coerce(v, args[1], f"{path}.{k}", source) for k, v in value.items()}
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
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


# ------------------------------------------------------------------------------------------ public API


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config file (with its bases) plus dotted overrides into a checked :class:`Config`."""
    merged = read_yaml_with_bases(path) if path is not None else {}
    merged = apply_overrides(merged, parse_overrides(overrides))
    return from_dict(Config, merged, source=str(path) if path is not None else "config")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Check a plain mapping (e.g. the config stored in a checkpoint) against the schema."""
    return from_dict(Config, data, source=source)


def dump_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically; ``load_config`` reads it back identically."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
