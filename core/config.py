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
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import operator
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from core import plugins
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


# ------------------------------------------------------------------------------------------- bounds


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
        text = f"{_type_name(number)} {self.range()}".strip()
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


# ----------------------------------------------------------------------------------------------- schema
# Defaults follow insightface arcface_torch (MS1MV2, r50, ArcFace, SGD) unless a comment says otherwise.


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = bounded(2048, min=0)


@dataclass
class AugmentConfig:
    """Probability of each augmentation (docs/methods.md §1.4). arcface_torch: flip only; AdaFace: 0.2 for
    the rest."""

    flip: float = bounded(0.5, **PROBABILITY)
    crop: float = bounded(0.0, **PROBABILITY)
    low_res: float = bounded(0.0, **PROBABILITY)
    photometric: float = bounded(0.0, **PROBABILITY)
    jitter: float = bounded(0.0, **PROBABILITY)
    # Synthetic face mask on the lower face (data.masks), drawn before the other augmentations: its
    # probability, the types drawn uniformly (surgical, n95, cloth, overlay) and, for ``overlay``, the folder
    # of the photographed masks (mask_<colour>.jpg, as in insightface's package data).
    mask: float = bounded(0.0, **PROBABILITY)
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
    image_size: int = bounded(112, min=1)  # side of the stored faces, checked against the data
    batch_size: int = bounded(128, min=1)  # per process
    num_workers: int = bounded(2, min=0)
    # Read from the data when left empty; a value given here is checked against the data.
    num_classes: int | None = bounded(None, min=1)
    num_images: int | None = bounded(None, min=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Batch order: ``random`` (every image once per epoch, shuffled) or ``pk`` (docs/methods.md §3.10:
    # every micro-batch holds batch_size / pk_k identities x pk_k images, each identity once per epoch,
    # its images repeated when it has fewer than pk_k).
    sampler: Literal["random", "pk"] = "random"
    pk_k: int = bounded(4, min=1)
    # A training image that cannot be read or decoded, or is not image_size x image_size: ``stop`` ends the
    # run with one line naming it; ``skip`` trains on another image of its identity in its place and counts
    # it (train.log), stopping once more than ``max_bad_records`` distinct records have failed.
    bad_records: Literal["stop", "skip"] = "stop"
    max_bad_records: int = 100
    # Verification .bin sets evaluated during training, looked up in val_root.
    val_root: str = ""
    val_targets: list[str] = field(
        default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"], metadata=limits(unique=True)
    )


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = bounded(512, min=1)
    dropout: float = bounded(0.0, min=0.0, below=1.0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    grad_checkpoint: bool = False
    channels_last: bool = False
    compile: bool = False
    # Side of the network's input; empty = data.image_size. Faces are stored and augmented at
    # data.image_size and resized to this on the device (a smaller input trains faster on CPUs).
    input_size: int | None = bounded(None, min=1)
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
    ddp_bucket_mb: int = bounded(25, min=1)
    ddp_fp16_grads: bool = False


@dataclass
class ObjectiveConfig:
    """The way of training, by registry name (``objectives/``): ``classification`` (Partial FC over a margin
    head, a loss on the per-sample cross-entropy), ``metric`` (a loss on the embeddings of PK batches),
    ``probface`` (an uncertainty module on a frozen backbone), or a registered one of the user's.
    ``auto`` takes it from the other sections: head.name none with model.uncertainty is probface,
    head.name none metric, any head classification. ``params`` go to its constructor."""

    name: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    """Margin head by registry name. ``params`` go to its constructor (checked against its signature when
    the head is built), so a head's own defaults apply: CosFace m 0.4, ArcFace m 0.5, AdaFace m 0.4, ...
    ``none``: no classifier; the loss is computed on the embeddings (``triplet``, ``probface``)."""

    name: str = "arcface"
    params: dict[str, Any] = field(default_factory=dict)
    # Partial FC: fraction of negative class centres sampled per step (1.0 = all).
    sample_rate: float = bounded(1.0, above=0.0, max=1.0)
    # Partial FC inter-class filtering (arcface_torch): non-target cosines above this are zeroed as likely
    # label-noise duplicates of the sample's identity; 0 = off (arcface_torch's default; 0.4 on noisy data).
    interclass_filtering_threshold: float = bounded(0.0, min=0.0, below=1.0)


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
    momentum: float = bounded(0.9, **PROBABILITY)
    # Closeness-diversity stage 2: every cd_interval steps (0: never) a mined batch of cd_classes classes
    # (over all ranks) x (cd_easy easy + cd_hard hard images) adds W_C closeness + W_D diversity, the
    # prototypes being the centres of the classes' cd_negatives hardest negative classes.
    cd_interval: int = bounded(0, min=0)
    cd_classes: int = bounded(64, min=1)
    cd_easy: int = bounded(7, min=2)  # closeness needs 2 images of a class
    cd_hard: int = bounded(1, min=1)
    cd_negatives: int = bounded(500, min=1)
    cd_weight_closeness: float = bounded(0.5, min=0.0)
    cd_weight_diversity: float = bounded(1.0, min=0.0)
    cd_percentile: float = bounded(0.2, **PROBABILITY)
    cd_scale: float = bounded(64.0, above=0.0)
    # Whose top negatives make the prototypes: the last sample of each selected class in the rank's batch
    # (the method's released code) or all of its samples (more prototypes when a class repeats).
    cd_prototypes: Literal["last", "all"] = "last"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(
        0.1, above=0.0
    )  # for a global batch of 1024 (insightface); scale linearly with the batch
    momentum: float = bounded(0.9, min=0.0, below=1.0)
    nesterov: bool = False
    weight_decay: float = bounded(5e-4, min=0.0)
    # Weight decay of BN parameters and biases (AdamW recipes usually use 0).
    no_decay_bn_bias: bool = False
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata=limits(length=2, min=0.0, below=1.0)
    )
    grad_clip: float = bounded(5.0, min=0.0)  # max global grad norm; 0 disables
    grad_accum: int = bounded(1, min=1)
    # Layer-wise lr decay: a backbone's layer i of L (ViTs: 0 the embeddings, i + 1 block i, L the head) takes
    # lr * layer_decay^(L - i); other modules the full lr. 1 switches it off.
    layer_decay: float = bounded(1.0, above=0.0, max=1.0)


@dataclass
class ScheduleConfig:
    name: Literal["polynomial", "multistep", "cosine"] = "polynomial"
    warmup_epochs: float = bounded(0.0, min=0.0)
    power: float = bounded(1.0, min=0.0)  # polynomial decay exponent (arcface_torch PolynomialLRWarmup: 1)
    # Epochs, multistep only.
    milestones: list[float] = field(default_factory=list, metadata=limits(min=0.0, increasing=True))
    gamma: float = bounded(0.1, above=0.0)
    min_lr: float = bounded(0.0, min=0.0)


@dataclass
class EmaConfig:
    """An exponential moving average of the backbone's weights (``objectives.ema``), validated beside the
    trained weights and saved in the checkpoint's ``ema`` entry. After every ``every``-th optimizer step
    that counts, update n: ema <- d ema + (1 - d) weights, d = 0 for the first update, then ``decay``
    (``warmup: none``), min(decay, 1 - n^-warmup_power) (``power``, timm's ModelEmaV3) or
    min(decay, (1 + n) / (10 + n)) (``tf``). Floating-point buffers (BN statistics) are averaged too."""

    enabled: bool = False
    decay: float = bounded(0.9998, min=0.0, below=1.0)
    warmup: Literal["none", "power", "tf"] = "power"
    warmup_power: float = bounded(2 / 3, above=0.0, max=1.0)
    every: int = bounded(1, min=1)  # optimizer steps between updates
    # Where the average lives: the training device, or the CPU (saves accelerator memory).
    device: Literal["device", "cpu"] = "device"
    # The weights whose validation result picks best.pt (train.best_metric): the trained ones or the average.
    select_best: Literal["raw", "ema"] = "raw"


@dataclass
class TrainConfig:
    epochs: int = bounded(20, min=1)
    log_every: int = bounded(50, min=1)  # steps between log lines / TensorBoard scalars
    val_every: int = bounded(2000, min=0)  # steps between validations (0: only at the end)
    val_batch_size: int = bounded(256, min=1)
    save_every: int = bounded(
        2000, min=0
    )  # steps between checkpoints, 0: none (a final one is always written)
    keep_last: int = bounded(3, min=1)
    # Validation result that picks best.pt: a .bin name (``lfw``), or ``mean`` over val_targets.
    best_metric: str = "mean"
    # A non-finite loss skips the step; this many in a row abort the run.
    max_bad_steps: int = bounded(5, min=1)
    # Stop after this many optimizer steps (0: run all epochs); the schedule is unchanged.
    max_steps: int = bounded(0, min=0)
    # Seconds a rank waits in a collective for the others (a stopped or dead rank) before the run stops
    # naming the operation and the rank; $FACEREC_COLLECTIVE_TIMEOUT_S overrides it. It must exceed the
    # longest time one rank works alone (rank 0 writing a checkpoint).
    collective_timeout_s: float = bounded(1800.0, above=0.0)
    # Under torchrun: seconds between checks that the launcher is alive; a rank whose launcher is gone
    # stops (0: no check).
    launcher_watch_s: float = bounded(5.0, min=0.0)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class CustomImportsConfig:
    """The user's own code (MMEngine's ``custom_imports``, :mod:`core.plugins`): Python files (relative to
    the config file that names them, or absolute) or module names, imported by :func:`load_config` before
    anything is built, so the parts they register are usable by name. A plain list is short for
    ``imports``; ``allow_failed_imports`` warns about an entry that does not import instead of stopping."""

    imports: list[str] = field(default_factory=list)
    allow_failed_imports: bool = False


@dataclass
class Config:
    # Checkpoints, config.yaml, train.log and TensorBoard files of the run go here.
    output_dir: str = bounded("work_dirs/default", nonempty=True)
    custom_imports: CustomImportsConfig = field(default_factory=CustomImportsConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where each dotted key was set (FILE line N, or the --set argument); load_config fills it.
    _origins: ClassVar[dict[str, str]] = {}

    def origin(self, key: str) -> str:
        """Where the value of dotted ``key`` was set: ``FILE line N``, ``--set KEY=VALUE``, or ``""`` (a
        default, or a config that :func:`load_config` did not read)."""
        return _locate(self._origins, key)


# ------------------------------------------------------------------------------------- reading files


def read_yaml_with_bases(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and merge its ``_base_`` files (recursively) beneath its own keys."""
    return _read_with_origins(path, _chain)[0]


def _read_with_origins(
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
        base_data, base_origins = _read_with_origins(path.parent / base, (*_chain, path))
        origins = _drop(origins, _reset_params(merged, base_data)) | base_origins
        merged = merge_dicts(merged, base_data)
    origins = _drop(origins, _reset_params(merged, raw))
    origins.update({key: f"{path} line {line}" for key, line in lines.items() if key.split(".")[0] in raw})
    return merge_dicts(merged, raw), origins


def _reset_params(base: Mapping[str, Any], top: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``params`` sections that merging ``top`` over ``base`` starts afresh (see :func:`_start_from`)."""
    renamed = isinstance(top.get("name"), str) and top["name"] != base.get("name")
    out = [f"{prefix}params"] if renamed and isinstance(base.get("params"), Mapping) else []
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out += _reset_params(base[key], value, f"{prefix}{key}.")
    return out


def _drop(origins: Mapping[str, str], sections: Iterable[str]) -> dict[str, str]:
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
    return _parse_overrides(items)[0]


def _parse_overrides(items: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
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
        sources = _drop(sources, [key]) | {key: where}  # replaced, with what it held
    return nested, sources


def _under(key: str, section: str) -> bool:
    """``key`` is ``section`` or lies inside it (``head.params.m`` in ``head.params``, ``x[0]`` in ``x``)."""
    return key == section or key.startswith(section + ".") or key.startswith(section + "[")


def _locate(origins: Mapping[str, str], key: str) -> str:
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
        raise wrong(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise wrong("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong(f"a list of {_type_name(args[0])}")
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


# ------------------------------------------------------------------------------------------ public API


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config file (with its bases) plus dotted overrides into a checked :class:`Config`.

    Errors name the key and where its value was set: the ``--set`` argument, or the file and line."""
    merged, origins = _read_with_origins(path) if path is not None else ({}, {})
    nested, sources = _parse_overrides(overrides)
    if plugins.KEY in nested:  # files named relative to the working directory
        nested[plugins.KEY] = plugins.resolve_entries(nested[plugins.KEY], Path.cwd())
    origins = _drop(origins, _reset_params(merged, nested))
    merged = apply_overrides(merged, nested)
    origins = (
        _drop(origins, sources) | sources
    )  # an override replaces what the files set at and inside its key
    try:
        merged, origins = _custom_imports_mapping(merged, origins)
        cfg = from_dict(Config, merged)
        validate(cfg)
    except ConfigError as err:
        where = _locate(origins, err.key) if err.key else ""
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
