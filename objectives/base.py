"""What a training objective is: the contract between ``train.py``'s loop and a way of training.

The loop owns what every run has: the data and its order, the backbone (wrapped in DDP and compiled), the
optimizer and schedule, the step with its gradient accumulation and its guard against non-finite values,
validation, checkpoints and resume. An :class:`Objective` owns the rest, the method: its modules (a
classifier, an uncertainty module, a loss), its config checks, the loss of a micro-batch, what rides on a
step that counts (difficulty scores, a mined batch's gradient), its log scalars and its part of a
checkpoint. Objectives are registered in :data:`OBJECTIVES` and chosen by ``objective.name`` (``auto``:
:func:`objective_name`).

One step, as the loop runs it::

    for images, labels, indices in micro_batches:          # grad_accum of them
        outputs = model(network_input(images))             # model = objective.network(backbone), wrapped
        loss, record = objective.loss(outputs, labels, indices)
        backward(loss); records.append(record)
    if the step is finite on every rank:
        objective.after_good_step(records, StepContext(step, backbone, loss_scale))
        clip objective.clip_parameters(backbone); optimizer.step()

Checkpoints keep format version 1 (``core.checkpoint``): ``state_dict()`` gives the top-level entries
``head``, ``uncertainty`` and ``difficulty`` (empty ones too), ``optimizer_state_dict`` the ``optimizer``
entry and ``meta()`` the ``meta`` keys ``num_classes``, ``head`` and ``uncertainty``, so checkpoints written
before objectives existed resume, and evaluators read every checkpoint alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.checkpoint import CheckpointError
from core.config import Config, ConfigError
from core.registry import Registry
from losses import LOSSES

OBJECTIVES = Registry("objective")

# The objectives ``objective.name: auto`` chooses among (by head.name and model.uncertainty, see
# :func:`objective_name`); naming one of them explicitly must agree with those keys.
BUILT_IN = ("classification", "metric", "probface")


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, or its input is unusable); the message says where and why."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What an objective may know of the training data, given when it is built."""

    labels: np.ndarray  # (images,) int64 identity of each image, by dataset position
    num_classes: int
    indices_per_identity: Callable[[], dict[int, np.ndarray]]  # identity -> its dataset positions
    load: Callable[[np.ndarray], torch.Tensor]  # dataset positions -> uint8 batch, this epoch's transform
    network_input: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> the network's input, on device
    device: torch.device
    epoch: Callable[[], int] = lambda: 0  # the epoch being trained (its transforms are keyed by it)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the loop tells :meth:`Objective.after_good_step`."""

    step: int  # optimizer steps done before this one (0 for the first)
    backbone: nn.Module  # the bare backbone (gradients of this step in its parameters' ``.grad``)
    loss_scale: float  # the gradient scaler's factor (1.0 without one): gradients are still scaled


def checkpoint_entries() -> dict[str, Any]:
    """The top-level entries of a version-1 checkpoint that belong to the objective, empty: no classifier
    (``head`` {}), no uncertainty module, no difficulty scores."""
    return {"head": {}, "uncertainty": None, "difficulty": None}


class Objective(nn.Module):
    """A way of training. Subclasses register with ``@OBJECTIVES.register("name")``, construct from
    ``(cfg, backbone, data, **objective.params)`` and implement :meth:`loss`; every other method has a
    default for an objective whose only trained module is the backbone.

    ``state_dict`` / ``load_state_dict`` are the objective's part of a checkpoint (top-level entries),
    not ``nn.Module``'s prefixed parameter dictionary."""

    def __init__(self, cfg: Config, backbone: nn.Module, data: TrainingData) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.device = cfg, data.num_classes, data.device

    def describe(self) -> str:
        """A few words for the run's first log line (``mbf + <these>: ...``)."""
        return type(self).__name__

    # -- configuration ------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, before the data is read, settings this objective cannot train with: a
        :class:`ConfigError` naming the key. The default refuses ``model.freeze_backbone`` (nothing would
        learn) and ``model.uncertainty`` (no uncertainty module)."""
        if cfg.model.uncertainty != "none":
            raise ConfigError(
                "model.uncertainty (ProbFace) trains with head.name: none and loss.name: probface",
                key="model.uncertainty",
            )
        if cfg.model.freeze_backbone:
            raise ConfigError(
                "model.freeze_backbone leaves nothing to train without model.uncertainty",
                key="model.freeze_backbone",
            )

    # -- what is trained ----------------------------------------------------------------------------

    def network(self, backbone: nn.Module) -> nn.Module:
        """The module the loop runs on a batch and wraps (DDP, compile): its output goes to :meth:`loss`.
        The output is the embedding, or a tuple whose first item is the embedding."""
        return backbone

    def parameter_modules(self) -> list[nn.Module]:
        """The objective's modules whose parameters the optimizer trains after the backbone's, in order
        (the checkpoint's optimizer state lists them so). Their buffers are restored when a step is
        skipped."""
        return []

    def clip_parameters(self, backbone: nn.Module) -> list[nn.Parameter]:
        """The parameters whose gradient norm ``optim.grad_clip`` bounds."""
        return list(backbone.parameters())

    def train_mode(self, backbone: nn.Module) -> None:
        """Put the backbone and the objective's modules in training mode (after validation, too)."""
        backbone.train()
        self.train()

    # -- one step -----------------------------------------------------------------------------------

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """(This rank's loss of one micro-batch, what :meth:`after_good_step` needs of it). ``labels`` and
        ``indices`` (dataset positions) are this rank's, on the CPU. DDP *sums* the backbone's gradients
        over ranks, so a loss of the rank's own batch is divided by the world size, and a loss of the
        global batch (Partial FC) is not."""
        raise NotImplementedError

    def after_good_step(self, records: list[Any], context: StepContext) -> None:
        """Called on every rank after a step whose loss and buffers were finite everywhere, before the
        optimizer steps, with what :meth:`loss` returned for each micro-batch. Skipped steps never get
        here, so nothing of theirs is kept."""

    def log_scalars(self) -> dict[str, float]:
        """Scalars for train.log and TensorBoard at each report (``section/name``: value)."""
        return {}

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The objective's top-level checkpoint entries (every rank must call it: shards are gathered)."""
        return checkpoint_entries()

    def load_state_dict(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
        """Load the entries of a checkpoint that passed :meth:`check_resumable` and :meth:`check_state_fits`.
        Returns notes for the resume line (what could not be carried over and starts afresh)."""
        return []

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The checkpoint's ``optimizer`` entry (every rank must call it)."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def meta(self) -> dict[str, Any]:
        """The objective's keys of the checkpoint's ``meta`` (what evaluators and resumes read)."""
        return {
            "num_classes": self.num_classes,
            "head": self.cfg.head.name,
            "uncertainty": self.cfg.model.uncertainty,
        }

    def check_resumable(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another kind of run (one line naming ``path``), before its settings are
        compared: the default refuses one with a classifier or an uncertainty module."""
        require_entry(self.cfg, state, path, "head", False)
        require_entry(self.cfg, state, path, "uncertainty", False)

    def resume_settings(self, state: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
        """(meta key, config key, the checkpoint's value, this run's) of the settings a checkpoint must share
        with this run, compared with the backbone's in one line."""
        meta = state.get("meta", {})
        return [(key, where, meta.get(key), value) for key, where, value in self.meta_settings()]

    def meta_settings(self) -> list[tuple[str, str, Any]]:
        return [
            ("uncertainty", "model.uncertainty", self.cfg.model.uncertainty),
            ("head", "head.name", self.cfg.head.name),
            ("num_classes", "data.root", self.num_classes),  # the classes are those of the data
        ]

    def check_state_fits(self, state: dict[str, Any], path: Path) -> None:
        """Refuse entries that would not load (other shapes, other keys), once the settings agree."""


def require_entry(cfg: Config, state: dict[str, Any], path: Path, entry: str, present: bool) -> None:
    """Refuse a checkpoint that has (``present`` False) or lacks a classifier (``head``) or an uncertainty
    module (``uncertainty``), naming what it was trained with."""
    meta = state.get("meta", {})
    if entry == "head" and bool(state.get("head")) != present:
        raise CheckpointError(
            f"{path}: trained with head {meta.get('head')!r}, this run has head.name {cfg.head.name!r}: a "
            "classifier and a loss on the embeddings do not resume one another"
        )
    if entry == "uncertainty" and (state.get("uncertainty") is not None) != present:
        raise CheckpointError(
            f"{path}: model.uncertainty was {meta.get('uncertainty', 'none')!r}, this run has "
            f"{cfg.model.uncertainty!r}"
        )


def state_misfit(saved: dict[str, Any], expected: dict[str, Any]) -> str:
    """What keeps ``saved`` from loading where ``expected`` is (missing and unexpected keys, other
    shapes), in a few words naming the first of each; '' when it fits."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing ({missing[0]}, ...)")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({unexpected[0]}, ...)")
    if shapes:
        k = shapes[0]
        old, new = tuple(saved[k].shape), tuple(expected[k].shape)
        parts.append(f"{len(shapes)} of another shape ({k}: {old}, this run: {new})")
    return ", ".join(parts)


def check_fits(path: Path, entries: Iterable[tuple[str, dict[str, Any], dict[str, Any], str, Any]]) -> None:
    """Refuse the first (entry, saved state, expected state, config key, value) whose state does not fit."""
    for name, saved, expected, key, value in entries:
        misfit = state_misfit(saved, expected)
        if misfit:
            raise CheckpointError(f"{path}: its {name} does not fit this run's {key} {value!r}: {misfit}")


# ------------------------------------------------------------------------------------------ choosing


def objective_name(cfg: Config) -> str:
    """The objective a config trains with: ``objective.name``, or with ``auto`` the one its other
    sections name (head.name none and model.uncertainty set: ``probface``; head.name none: ``metric``;
    a head: ``classification``), as configs written before objectives existed meant. A built-in name that
    contradicts those sections is refused in one line."""
    implied = (
        "classification"
        if cfg.head.name != "none"
        else "probface"
        if cfg.model.uncertainty != "none"
        else "metric"
    )
    name = cfg.objective.name
    if name == "auto":
        return implied
    if name in BUILT_IN and name != implied:
        where = cfg.origin("objective.name")
        problem = (
            f"objective.name {name!r} does not fit head.name {cfg.head.name!r} and model.uncertainty "
            f"{cfg.model.uncertainty!r}, which train the {implied!r} objective; set objective.name: auto "
            f"or {implied}, or change head.name / model.uncertainty"
        )
        raise ConfigError(f"{where}: {problem}" if where else problem, key="objective.name")
    return name


def objective_class(cfg: Config) -> type[Objective]:
    """The registered class of the config's objective, its ``objective.params`` and its settings checked
    (each refusal one line naming the key and where its value was set)."""
    name = objective_name(cfg)
    try:
        OBJECTIVES.check_name(name, "objective.name")
        OBJECTIVES.check_kwargs(name, cfg.objective.params, "objective.params", ("cfg", "backbone", "data"))
        cls = OBJECTIVES.get(name)
        cls.check_config(cfg)
    except ConfigError as err:
        where = cfg.origin(err.key) if err.key else ""
        raise ConfigError(f"{where}: {err}" if where else str(err), key=err.key) from None
    return cls


def build_objective(cfg: Config, backbone: nn.Module, data: TrainingData) -> Objective:
    """The config's objective for ``backbone`` on ``data`` (checked by :func:`objective_class`)."""
    return objective_class(cfg)(cfg, backbone, data, **cfg.objective.params)


def check_loss(cfg: Config) -> None:
    """``loss.name`` is registered and takes ``loss.params`` (``class_weights`` comes from the data)."""
    LOSSES.check_name(cfg.loss.name, "loss.name")
    LOSSES.check_kwargs(cfg.loss.name, cfg.loss.params, "loss.params", ("class_weights",))


def is_loss_on_cross_entropy(name: str) -> bool:
    """Whether registered loss ``name`` is a function of the per-sample cross-entropy: it offers
    ``reduce(ce, labels)``, which Partial FC's sharded cross-entropy feeds (a loss without it takes the
    network's outputs)."""
    return callable(getattr(LOSSES.get(name), "reduce", None))


def refused_by(cfg: Config, section: str, err: ValueError) -> ConfigError:
    """A value that the constructor of the head or loss refuses (an arcface variant, a negative focal
    gamma): its message, with the part, its params and where they were set."""
    part = getattr(cfg, section)
    where = cfg.origin(f"{section}.params")
    what = f"{section} {part.name} ({section}.params {part.params})"
    return ConfigError(f"{where}: {what}: {err}" if where else f"{what}: {err}")
