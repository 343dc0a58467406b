"""ProbFace (docs/methods.md §3.11): an uncertainty module learns sigma^2 on the last feature map of a
frozen pretrained backbone (``model.uncertainty``, ``model.freeze_backbone``, ``model.pretrained``), with
the ``probface`` loss on PK batches (MLS + output constraint + attention triplet).

The network trained is ``ProbFaceNet``: one backbone pass gives the embedding and the map the module reads.
A frozen backbone keeps its weights, BN statistics and dropout as loaded (inference mode), so the
checkpoint's backbone is the pretrained one, and only the module (saved as the ``uncertainty`` entry) learns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from backbones.contract import has_feature_output
from core.config import Config, ConfigError
from objectives.base import OBJECTIVES, TrainingData, check_fits, require_entry
from objectives.metric import Metric, check_pk_settings
from probface.model import ProbFaceNet, UncertaintyModule, conv_final_size


def build_uncertainty(cfg: Config, backbone: nn.Module) -> UncertaintyModule:
    """The uncertainty module of ``model.uncertainty`` on ``backbone``'s flattened last map."""
    if not has_feature_output(backbone):
        raise ConfigError(
            f"model.backbone {cfg.model.backbone} does not return its last feature map "
            "(forward(x, return_features=True)), which model.uncertainty reads"
        )
    momentum = cfg.model.uncertainty_bn_momentum
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"model.uncertainty_bn_momentum must be in (0, 1], got {momentum}")
    in_features = conv_final_size(backbone, cfg.model.input_size or cfg.data.image_size)
    return UncertaintyModule(
        in_features, cfg.model.uncertainty, cfg.model.embedding_size, bn_momentum=momentum
    )


@OBJECTIVES.register("probface")
class ProbFace(Metric):
    """The uncertainty module on a (frozen) backbone, trained with the ``probface`` loss."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.uncertainty == "none":
            raise ConfigError(
                "the probface objective trains an uncertainty module: set model.uncertainty: scalar or "
                "per_dim",
                key="model.uncertainty",
            )
        check_pk_settings(cfg)
        if cfg.loss.name != "probface":
            raise ConfigError(
                "loss.name probface and model.uncertainty (scalar or per_dim) go together", key="loss.name"
            )

    def __init__(self, cfg: Config, backbone: nn.Module, data: TrainingData) -> None:
        self_uncertainty = build_uncertainty(cfg, backbone)  # first: its initial weights draw from the seed
        super().__init__(cfg, backbone, data)
        self.uncertainty = self_uncertainty

    def describe(self) -> str:
        return f"probface ({self.cfg.model.uncertainty} uncertainty)"

    def network(self, backbone: nn.Module) -> nn.Module:
        return ProbFaceNet(backbone, self.uncertainty, frozen_backbone=self.cfg.model.freeze_backbone)

    def parameter_modules(self) -> list[nn.Module]:
        return [self.uncertainty, self.criterion]

    def clip_parameters(self, backbone: nn.Module) -> list[nn.Parameter]:
        return [*backbone.parameters(), *self.uncertainty.parameters()]

    def train_mode(self, backbone: nn.Module) -> None:
        """A frozen backbone keeps its BN statistics and no dropout."""
        backbone.train(not self.cfg.model.freeze_backbone)
        self.train()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {**super().state_dict(), "uncertainty": self.uncertainty.state_dict()}

    def load_state_dict(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> list[str]:  # type: ignore[override]
        self.uncertainty.load_state_dict(state["uncertainty"])
        return []

    def check_resumable(self, state: dict[str, Any], path: Path) -> None:
        require_entry(self.cfg, state, path, "head", False)
        require_entry(self.cfg, state, path, "uncertainty", True)

    def check_state_fits(self, state: dict[str, Any], path: Path) -> None:
        expected = self.uncertainty.state_dict()
        check_fits(path, [("uncertainty", state["uncertainty"], expected, "model.uncertainty",
                           self.cfg.model.uncertainty)])  # fmt: skip
