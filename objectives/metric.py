"""Metric learning: a loss on the embeddings of PK batches, no classifier (``head.name: none``), e.g. the
triplet loss with online mining (docs/methods.md §3.10).

Each rank's micro-batch is a PK batch of its own (``data.sampler: pk``), its loss computed on it alone; the
rank's share of the mean over ranks is that loss divided by the world size, as DDP sums the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.config import Config, ConfigError
from core.distributed import get_world_size
from losses import LOSSES
from objectives.base import (
    OBJECTIVES,
    Objective,
    TrainingData,
    check_loss,
    is_loss_on_cross_entropy,
    refused_by,
)


def check_pk_settings(cfg: Config) -> None:
    """What every loss on the embeddings needs: no head, PK batches, no mining by a head's cosines."""
    if cfg.head.name != "none":
        raise ConfigError(
            f"a loss on the embeddings trains without a classifier: set head.name: none (got "
            f"{cfg.head.name!r})",
            key="head.name",
        )
    if cfg.data.sampler != "pk":
        raise ConfigError(
            "head.name none trains on the embeddings, whose loss needs several images per identity in each "
            "batch: set data.sampler: pk",
            key="data.sampler",
        )
    if cfg.mining.difficulty:
        raise ConfigError(
            "mining.difficulty tracks a head's target cosines; head.name is none", key="mining.difficulty"
        )
    if cfg.mining.cd_interval > 0:
        raise ConfigError(
            "mining.cd_interval mines by a head's cosines; head.name is none", key="mining.cd_interval"
        )
    check_loss(cfg)
    if is_loss_on_cross_entropy(cfg.loss.name):
        raise ConfigError(
            f"loss.name {cfg.loss.name!r} is a loss on a head's cross-entropy; head.name none needs a loss "
            "on the embeddings (triplet, probface)",
            key="loss.name",
        )


def build_criterion(cfg: Config) -> nn.Module:
    try:
        return LOSSES.build(cfg.loss.name, **cfg.loss.params)
    except ValueError as err:
        raise refused_by(cfg, "loss", err) from None


@OBJECTIVES.register("metric")
class Metric(Objective):
    """A registered loss on the network's outputs and this rank's labels (``loss.name``)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_pk_settings(cfg)
        if cfg.loss.name == "probface":
            raise ConfigError(
                "loss.name probface and model.uncertainty (scalar or per_dim) go together", key="loss.name"
            )

    def __init__(self, cfg: Config, backbone: nn.Module, data: TrainingData) -> None:
        super().__init__(cfg, backbone, data)
        self.criterion = build_criterion(cfg)

    def describe(self) -> str:
        return f"{self.cfg.loss.name} on the embeddings"

    def parameter_modules(self) -> list[nn.Module]:
        return [self.criterion]

    def loss(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """The loss of this rank's PK micro-batch, as its share of the mean over the ranks."""
        labels = labels.to(self.device, non_blocking=True)
        return self.criterion(outputs, labels) / get_world_size(), None

    def log_scalars(self) -> dict[str, float]:
        # the last micro-batch's terms of the loss (active triplets, ProbFace's MLS, ...)
        return {f"loss/{k}": float(v) for k, v in getattr(self.criterion, "last_stats", {}).items()}
