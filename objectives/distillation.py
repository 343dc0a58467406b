"""Distillation from any embedder (``objective.name: distillation``; docs/methods.md §3.13).

The student (the backbone) learns the features of a teacher, any model the evaluators accept (an ONNX
file, a checkpoint of this framework, an insightface ``model.pt``, an AdaFace ``.ckpt``; see
``objectives.teacher`` for how its features are computed, cached or online). The loss of a micro-batch of
``B`` images with student embeddings ``s_i`` and teacher features ``t_i`` is

    L = classification_weight * L_cls + feature_weight * L_feat + similarity_weight * L_sim

* ``L_feat`` (``feature_loss``): ``cosine``: mean of ``1 - cos(P s_i, t_i)``; ``l2``: mean of
  ``||P s_i / |P s_i| - t_i / |t_i| ||^2``, where ``P`` is a learned linear map (no bias) from the student's
  to the teacher's dimension when they differ, the identity otherwise;
* ``L_sim``: the mean squared difference of the off-diagonal entries of the batch's cosine-similarity
  matrices, ``sum_{i != j} (cos(s_i, s_j) - cos(t_i, t_j))^2 / (B (B - 1))``, over each process's own
  micro-batch (not the gathered global batch);
* ``L_cls``: with a margin head (``head.name`` not none), the ``classification`` objective's loss on the
  labels (Partial FC + head + ``loss.name``), which this objective holds and delegates to (its difficulty
  scores and closeness-diversity mining included). With ``head.name: none`` there is no ``L_cls``.

The feature and similarity terms are the process's own, divided by the world size (DDP sums the
gradients); the classification term is that of the global batch, as in ``classification``. Checkpoints
keep format 1: the classification's entries (``head`` ...), plus ``distillation`` holding the projection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import CheckpointError
from core.config import Config, ConfigError
from core.distributed import get_world_size
from data.builder import open_train_source
from objectives.base import (
    OBJECTIVES,
    Objective,
    StepContext,
    TrainingData,
    TrainingError,
    check_fits,
    require_entry,
)
from objectives.classification import Classification
from objectives.teacher import MODES, Teacher

FEATURE_LOSSES = ("cosine", "l2")


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(s, t)`` (``cosine``) or ``|s/|s| - t/|t||^2`` (``l2``); ``student``
    already projected to the teacher's dimension."""
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    if kind == "cosine":
        return (1 - (s * t).sum(1)).mean()
    return (s - t).pow(2).sum(1).mean()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the off-diagonal entries of the two batches' cosine-similarity matrices."""
    n = student.shape[0]
    if n < 2:
        return student.sum() * 0
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    diff = s @ s.T - t @ t.T
    off = ~torch.eye(n, dtype=torch.bool, device=diff.device)
    return diff[off].pow(2).mean()


@OBJECTIVES.register("distillation")
class Distillation(Objective):
    """Feature and similarity-matrix distillation from a teacher embedder, optionally with a margin head
    on the labels (see the module notes). ``objective.params``:

    * ``teacher``: the teacher's model file (required); ``teacher_backbone``: its architecture when it is a
      plain state dict (insightface ``model.pt``, AdaFace ``.ckpt``); ``teacher_color``: its colour order
      (default: the file's own, else rgb; AdaFace bgr);
    * ``feature_weight``, ``feature_loss`` (cosine | l2), ``similarity_weight``,
      ``classification_weight`` (with a head);
    * ``teacher_mode``: auto | cache | online; ``cache_dir``: the folder of cached teacher features
      (default ``<output_dir>/../teacher_cache``); ``teacher_batch_size``."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        params = cfg.objective.params
        teacher = params.get("teacher")
        if not teacher:
            raise ConfigError(
                "objective.params.teacher: the distillation objective needs a teacher model file",
                key="objective.params",
            )
        if not Path(str(teacher)).is_file():
            raise ConfigError(f"objective.params.teacher {teacher}: no such file", key="objective.params")
        if params.get("feature_loss", "cosine") not in FEATURE_LOSSES:
            raise ConfigError(
                f"objective.params.feature_loss {params['feature_loss']!r} is not one of "
                f"{', '.join(FEATURE_LOSSES)}",
                key="objective.params",
            )
        if params.get("teacher_mode", "auto") not in MODES:
            raise ConfigError(
                f"objective.params.teacher_mode {params['teacher_mode']!r} is not one of {', '.join(MODES)}",
                key="objective.params",
            )
        weights = {k: float(params.get(k, 1.0 if k != "similarity_weight" else 0.0))
                   for k in ("feature_weight", "similarity_weight", "classification_weight")}  # fmt: skip
        bad = [k for k, v in weights.items() if not v >= 0]
        if bad:
            raise ConfigError(f"objective.params.{bad[0]} must be >= 0", key="objective.params")
        if cfg.head.name != "none":
            Classification.check_config(cfg)
        else:
            if weights["feature_weight"] == 0 and weights["similarity_weight"] == 0:
                raise ConfigError(
                    "objective.params: feature_weight and similarity_weight are both 0 and head.name is "
                    "none: nothing to learn",
                    key="objective.params",
                )
            for key in ("difficulty", "cd_interval"):
                if getattr(cfg.mining, key):
                    raise ConfigError(
                        f"mining.{key} rides on a margin head's cosines; head.name is none",
                        key=f"mining.{key}",
                    )

    def __init__(
        self,
        cfg: Config,
        backbone: nn.Module,
        data: TrainingData,
        teacher: str = "",
        teacher_backbone: str | None = None,
        teacher_color: str | None = None,
        feature_weight: float = 1.0,
        feature_loss: str = "cosine",
        similarity_weight: float = 0.0,
        classification_weight: float = 1.0,
        teacher_mode: str = "auto",
        cache_dir: str = "",
        teacher_batch_size: int = 128,
    ) -> None:
        super().__init__(cfg, backbone, data)
        self.weights = (float(classification_weight), float(feature_weight), float(similarity_weight))
        self.kind = feature_loss
        self.classification = Classification(cfg, backbone, data) if cfg.head.name != "none" else None
        try:
            self.teacher = Teacher(
                cfg, teacher, teacher_backbone, teacher_color, teacher_mode,
                cache_dir or str(Path(cfg.output_dir).parent / "teacher_cache"), teacher_batch_size,
                data.load, data.epoch, open_train_source(cfg.data),
            )  # fmt: skip
        except ValueError as err:
            raise TrainingError(f"objective.params.teacher: {err}") from None
        student_dim = cfg.model.embedding_size
        self.projection = (
            nn.Linear(student_dim, self.teacher.dim, bias=False) if student_dim != self.teacher.dim else None
        )
        if self.projection is not None:
            generator = torch.Generator().manual_seed(cfg.experiment.seed)
            bound = 1 / student_dim**0.5
            with torch.no_grad():
                self.projection.weight.uniform_(-bound, bound, generator=generator)
        self.last: dict[str, float] = {}

    def describe(self) -> str:
        parts = [f"distillation from {self.teacher.path.name} ({self.teacher.mode}: {self.teacher.reason})"]
        if self.classification is not None:
            parts.append(self.classification.describe())
        return " + ".join(parts)

    def parameter_modules(self) -> list[nn.Module]:
        own = [self.projection] if self.projection is not None else []
        return [*(self.classification.parameter_modules() if self.classification else []), *own]

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        embeddings = outputs if torch.is_tensor(outputs) else outputs[0]
        w_cls, w_feat, w_sim = self.weights
        target = self.teacher.features(indices).to(embeddings.device)
        world = get_world_size()
        total = embeddings.new_zeros(())
        record = None
        if self.classification is not None:
            cls_loss, record = self.classification.loss(outputs, labels, indices)
            total = total + w_cls * cls_loss
            self.last["classification"] = float(cls_loss.detach())
        if w_feat > 0:
            projected = self.projection(embeddings.float()) if self.projection is not None else embeddings
            feat = feature_loss(projected, target, self.kind)
            total = total + w_feat * feat / world
            self.last["feature"] = float(feat.detach())
        if w_sim > 0:
            sim = similarity_loss(embeddings, target)
            total = total + w_sim * sim / world
            self.last["similarity"] = float(sim.detach())
        return total, record

    def after_good_step(self, records: list[Any], context: StepContext) -> None:
        if self.classification is not None:
            self.classification.after_good_step(records, context)

    def log_scalars(self) -> dict[str, float]:
        values = {f"distill/{k}": v for k, v in self.last.items()}
        if self.classification is not None:
            values.update(self.classification.log_scalars())
        return values

    # -- checkpoints --------------------------------------------------------------------------------

    def own_state(self) -> dict[str, Any]:
        return {"projection": self.projection.state_dict() if self.projection is not None else None}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = self.classification.state_dict() if self.classification else super().state_dict()
        return {**state, "distillation": self.own_state()}

    def load_state_dict(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
        notes = self.classification.load_state_dict(state) if self.classification else []
        if self.projection is not None:
            self.projection.load_state_dict(state["distillation"]["projection"])
        return notes

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.classification is not None:
            return self.classification.optimizer_state_dict(optimizer)
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.classification is not None:
            self.classification.load_optimizer_state_dict(optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "objective": "distillation"}

    def check_resumable(self, state: dict[str, Any], path: Path) -> None:
        if state.get("distillation") is None:
            raise CheckpointError(f"{path}: not trained with the distillation objective")
        require_entry(self.cfg, state, path, "head", self.classification is not None)
        require_entry(self.cfg, state, path, "uncertainty", False)

    def resume_settings(self, state: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
        if self.classification is not None:
            return self.classification.resume_settings(state)
        return super().resume_settings(state)

    def check_state_fits(self, state: dict[str, Any], path: Path) -> None:
        if self.classification is not None:
            self.classification.check_state_fits(state, path)
        saved = state["distillation"].get("projection") or {}
        expected = self.projection.state_dict() if self.projection is not None else {}
        check_fits(
            path, [("projection", saved, expected, "objective.params.teacher", str(self.teacher.path))]
        )
