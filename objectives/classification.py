"""Classification: Partial FC over a registered margin head, and a loss on the per-sample cross-entropy
(``cross_entropy``, ``focal``, ``frabsm_weight``); the objective of ``head.name: <a head>``.

The classifier's centres are sharded across ranks (``heads.partial_fc``), so its loss is that of the
global batch: each rank's backbone gradient is the global loss's through its own samples, and DDP sums
them. A head's own regulariser (MagFace's g(a)) joins as this rank's share of a global mean.

Two kinds of mining ride on it, each fed explicitly by what :meth:`PartialFC.scores` returns:

* ``mining.difficulty``: per-image scores, an EMA of each image's target cosine (docs/methods.md §3.8),
  updated on every rank from the global batch of each step that counts;
* ``mining.cd_interval``: closeness-diversity stage 2, a mined batch whose gradient joins the step's
  every ``cd_interval`` steps; it reads the scores and the last micro-batch's cosines.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from core.checkpoint import CheckpointError
from core.config import Config, ConfigError
from core.distributed import any_rank, get_rank, get_world_size
from heads.partial_fc import PartialFC, ShardCosines
from heads.registry import HEADS
from losses import LOSSES
from losses.softmax_losses import inverse_log_frequency_weights
from mining.closeness_diversity import ClosenessDiversityMiner, MinedTerms, is_mining_step
from mining.difficulty import DifficultyScores
from objectives.base import (
    OBJECTIVES,
    Objective,
    StepContext,
    TrainingData,
    TrainingError,
    check_fits,
    check_loss,
    is_loss_on_cross_entropy,
    refused_by,
    require_entry,
)


class MicroBatch(NamedTuple):
    """What a step keeps of one micro-batch for the mining that rides on it."""

    labels: torch.Tensor  # this rank's labels
    indices: torch.Tensor  # this rank's dataset positions
    target_cos: torch.Tensor  # their target cosines (this rank's rows of the global batch's)
    cosines: ShardCosines | None  # the shard's cosines of the global batch (closeness-diversity only)


@OBJECTIVES.register("classification")
class Classification(Objective):
    """Partial FC + margin head + a loss on the per-sample cross-entropy, with optional difficulty scores
    and closeness-diversity mining."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.head.name == "none":
            raise ConfigError(
                "the classification objective needs a margin head: head.name is none", "head.name"
            )
        HEADS.check_name(cfg.head.name, "head.name")
        HEADS.check_kwargs(cfg.head.name, cfg.head.params, "head.params", ("embedding_size", "num_classes"))
        check_loss(cfg)
        if not is_loss_on_cross_entropy(cfg.loss.name):
            raise ConfigError(
                f"loss.name {cfg.loss.name!r} is not a loss on the head's cross-entropy (a loss on the "
                "embeddings trains with head.name: none)",
                key="loss.name",
            )
        if cfg.mining.cd_interval > 0 and not cfg.mining.difficulty:
            raise ConfigError(
                "mining.cd_interval needs mining.difficulty: true (stage 2 mines by the scores)",
                key="mining.cd_interval",
            )

    def __init__(self, cfg: Config, backbone: nn.Module, data: TrainingData) -> None:
        super().__init__(cfg, backbone, data)
        if data.num_classes < 2:
            raise TrainingError(
                f"data.root {cfg.data.root} holds {data.num_classes} identity: a classifier needs at least 2 "
                "(with one, the loss is 0 from the first step and nothing is learnt)"
            )
        self.classifier = build_classifier(cfg, data.num_classes)
        self.criterion = build_criterion(cfg, data.labels, data.num_classes)
        self.difficulty = (
            DifficultyScores(len(data.labels), cfg.mining.momentum, seed=cfg.experiment.seed)
            if cfg.mining.difficulty
            else None
        )
        self.miner = build_miner(cfg, data)
        self.network_input = data.network_input
        self.mined: MinedTerms | None = None  # the last mined batch's terms (for the log)

    def describe(self) -> str:
        return self.cfg.head.name

    def parameter_modules(self) -> list[nn.Module]:
        return [self.classifier, self.criterion]

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, MicroBatch]:
        """The global batch's loss on the sharded classifier, plus a head's own regulariser (MagFace) as
        this rank's share of a global mean."""
        embeddings = outputs if torch.is_tensor(outputs) else outputs[0]
        labels_here = labels.to(embeddings.device, non_blocking=True)
        scores = self.classifier.scores(embeddings, labels_here, keep_cosines=self.miner is not None)
        loss = self.criterion.reduce(scores.ce, scores.labels)
        regularizer = getattr(self.classifier.head, "regularizer", None)
        if regularizer is not None:
            loss = loss + regularizer(embeddings) / get_world_size()
        rows = slice(get_rank() * len(labels), (get_rank() + 1) * len(labels))
        return loss, MicroBatch(labels, indices, scores.target_cos[rows], scores.cosines)

    def after_good_step(self, records: list[MicroBatch], context: StepContext) -> None:
        if self.difficulty is not None:  # only a step that counts moves the scores
            for batch in records:
                self.difficulty.update(batch.indices.to(self.device), batch.target_cos)
        if self.miner is not None and is_mining_step(context.step, self.cfg.mining.cd_interval):
            self.add_mined_gradient(context, records[-1])

    def add_mined_gradient(self, context: StepContext, batch: MicroBatch) -> None:
        """Closeness-diversity stage 2: the mined batch's gradient joins the step's (skipped if not finite).
        It mines around the last micro-batch's classes, with its cosines."""
        rng = np.random.default_rng([self.cfg.experiment.seed, get_rank(), context.step])
        grads, terms = self.miner.gradient(
            context.backbone, self.classifier, batch.cosines, self.difficulty, batch.labels,
            self.network_input, rng, context.loss_scale,
        )  # fmt: skip
        if any_rank(not (math.isfinite(terms.closeness) and math.isfinite(terms.diversity))):
            return  # on every rank alike: the gradients were already summed over ranks
        params = [p for p in context.backbone.parameters() if p.requires_grad]
        for p, g in zip(params, grads, strict=True):
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.mined = terms

    def log_scalars(self) -> dict[str, float]:
        values = {}
        if self.difficulty is not None:
            values["mining/difficulty_mean"] = float(self.difficulty.scores.mean())
        if self.mined is not None:
            values.update({"mining/closeness": self.mined.closeness, "mining/diversity": self.mined.diversity,
                           "mining/threshold": self.mined.threshold})  # fmt: skip
        for name, buffer in self.classifier.head.named_buffers():
            if buffer.ndim == 0:  # AdaFace batch_mean/batch_std, CurricularFace t
                values[f"head/{name}"] = float(buffer)
        return values

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        state["head"] = self.classifier.state_dict()  # unsharded
        if self.difficulty is not None:
            state["difficulty"] = self.difficulty.scores
        return state

    def load_state_dict(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
        self.classifier.load_state_dict(state["head"])
        if self.difficulty is None:
            return []
        if state.get("difficulty") is None:
            return ["mining.difficulty (scores start at U(0, 1): the checkpoint has none)"]
        self.difficulty.scores.copy_(state["difficulty"])
        return []

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.classifier.optimizer_state_dict(optimizer)  # the centres' state gathered

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        self.classifier.load_optimizer_state_dict(optimizer, state)

    def check_resumable(self, state: dict[str, Any], path: Path) -> None:
        require_entry(self.cfg, state, path, "head", True)
        require_entry(self.cfg, state, path, "uncertainty", False)

    def resume_settings(self, state: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
        settings = super().resume_settings(state)
        meta, head = state.get("meta", {}), state.get("head", {})
        if "num_classes" not in meta and torch.is_tensor(head.get("weight")):  # older checkpoints
            classes = int(head["weight"].shape[0])
            settings = [
                (k, key, classes if k == "num_classes" else old, new) for k, key, old, new in settings
            ]
        return settings

    def check_state_fits(self, state: dict[str, Any], path: Path) -> None:
        head = dict(self.classifier.head.state_dict())
        head["weight"] = torch.empty(self.num_classes, self.cfg.model.embedding_size, device="meta")
        check_fits(path, [("head", state["head"], head, "head.name", self.cfg.head.name)])
        scores = state.get("difficulty")
        if (
            self.difficulty is not None
            and scores is not None
            and scores.shape != self.difficulty.scores.shape
        ):
            raise CheckpointError(
                f"{path}: difficulty scores of {scores.numel()} images, the data has "
                f"{self.difficulty.scores.numel()}"
            )


def build_classifier(cfg: Config, num_classes: int) -> PartialFC:
    """Partial FC over ``head.name`` with ``head.params``, its centres drawn from the experiment's seed."""
    try:
        return PartialFC(
            cfg.head.name, cfg.model.embedding_size, num_classes, cfg.head.sample_rate,
            init_seed=cfg.experiment.seed,
            interclass_filtering_threshold=cfg.head.interclass_filtering_threshold, **cfg.head.params,
        )  # fmt: skip
    except ValueError as err:
        raise refused_by(cfg, "head", err) from None


def build_criterion(cfg: Config, labels: np.ndarray, num_classes: int) -> nn.Module:
    """The loss on the per-sample cross-entropy, with ``loss.class_weights`` computed from ``labels``."""
    params = dict(cfg.loss.params)
    if cfg.loss.class_weights == "inverse_log_frequency":
        counts = torch.from_numpy(np.bincount(labels, minlength=num_classes))
        params["class_weights"] = inverse_log_frequency_weights(counts.clamp(min=1))
    try:
        return LOSSES.build(cfg.loss.name, **params)
    except ValueError as err:
        raise refused_by(cfg, "loss", err) from None


def build_miner(cfg: Config, data: TrainingData) -> ClosenessDiversityMiner | None:
    """Closeness-diversity stage 2 (``mining.cd_interval`` > 0), loading its images with ``data.load``."""
    m = cfg.mining
    if m.cd_interval <= 0:
        return None
    return ClosenessDiversityMiner(
        data.indices_per_identity(), data.load, classes=m.cd_classes, num_easy=m.cd_easy,
        num_hard=m.cd_hard, negatives=m.cd_negatives, weight_closeness=m.cd_weight_closeness,
        weight_diversity=m.cd_weight_diversity, percentile=m.cd_percentile, scale=m.cd_scale,
        prototype_rows=m.cd_prototypes,
    )  # fmt: skip
