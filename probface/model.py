"""ProbFace's uncertainty module and the network that pairs it with a (frozen) backbone
(docs/methods.md §3.11).

The backbone gives the embedding (mu is its unit vector) and, from the same pass, its flattened last
convolutional map ``conv_final`` (``backbone(x, return_features=True)``, see ``backbones``). The uncertainty
module maps ``conv_final`` to log sigma^2:

    flatten(conv_final) -> FC 256 + BN + ReLU -> FC to 1 (scalar) or D (per dimension)
      -> BN without scale or centre -> gamma * z + beta (one learnable gamma and beta shared by all outputs,
      initially 0.1 and -1 (scalar) or -7 (per dimension)) -> log sigma^2 = log(1e-6 + exp(.))

The FC layers have no bias (each is followed by a BN that would cancel it) and start from Xavier-uniform
weights, as TensorFlow-slim's fully-connected layers in the ProbFace release. Both BNs use that release's
settings: epsilon 1e-3 and a moving-average decay of 0.995, which is PyTorch momentum 0.005 (TensorFlow
keeps ``decay`` of the old statistics, PyTorch adds ``momentum`` of the batch's). At that momentum the
running statistics forget their initial (0, 1) after about a thousand steps (0.995^1000 = 0.7%); ProbFace
trains 12,000; a run of a few hundred steps needs a larger ``bn_momentum`` (``model.uncertainty_bn_momentum``,
e.g. 0.1: after 60 steps at 0.005 the running statistics are still 74% their initial values).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backbones.contract import has_feature_output

KINDS = ("scalar", "per_dim")
BETA_INIT = {"scalar": -1.0, "per_dim": -7.0}
GAMMA_INIT = 0.1
SIGMA2_FLOOR = 1e-6
BN_EPS = 1e-3  # ProbFace's TensorFlow batch_norm epsilon
BN_MOMENTUM = 0.005  # ProbFace's decay 0.995 in PyTorch's convention (1 - decay)


class UncertaintyModule(nn.Module):
    """``conv_final`` (N, in_features) -> log sigma^2, (N, 1) for ``scalar`` or (N, D) for ``per_dim``.

    ``bn_eps`` and ``bn_momentum`` (PyTorch's convention) are those of both BatchNorm layers."""

    def __init__(
        self,
        in_features: int,
        kind: str = "scalar",
        embedding_size: int = 0,
        hidden: int = 256,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"uncertainty kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "per_dim" and embedding_size < 1:
            raise ValueError("a per-dimension uncertainty needs the embedding size D")
        self.kind, self.in_features = kind, in_features
        outputs = 1 if kind == "scalar" else embedding_size
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden, eps=bn_eps, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, outputs, bias=False)
        self.bn2 = nn.BatchNorm1d(outputs, eps=bn_eps, momentum=bn_momentum, affine=False)
        self.gamma = nn.Parameter(torch.tensor([GAMMA_INIT]))
        self.beta = nn.Parameter(torch.tensor([BETA_INIT[kind]]))
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)

    def forward(self, conv_final: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=conv_final.device.type, enabled=False):
            x = conv_final.to(self.fc1.weight.dtype)  # fp32 even when the backbone body ran in fp16
            z = self.bn2(self.fc2(self.relu(self.bn1(self.fc1(x)))))
            floor = torch.tensor(math.log(SIGMA2_FLOOR), device=z.device)
            return torch.logaddexp(self.gamma * z + self.beta, floor)  # log(1e-6 + exp(.)), no overflow


def conv_final_size(backbone: nn.Module, input_size: int) -> int:
    """Length of the backbone's flattened last map for ``input_size`` inputs (one eval-mode pass on zeros,
    which leaves BN statistics alone)."""
    if hasattr(backbone, "conv_final_dim"):
        return int(backbone.conv_final_dim)
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters())
        with torch.no_grad():
            x = torch.zeros(1, 3, input_size, input_size, device=param.device)
            return int(backbone(x, return_features=True)[1].shape[1])
    finally:
        backbone.train(was_training)


class ProbFaceNet(nn.Module):
    """A backbone and an uncertainty module: ``x`` -> ``(embedding, log sigma^2)`` from one backbone pass.

    With ``frozen_backbone`` the backbone's parameters take no gradient and it stays in inference mode
    (BN running statistics and dropout as trained) whatever ``train()`` is called with.
    """

    def __init__(self, backbone: nn.Module, uncertainty: UncertaintyModule, frozen_backbone: bool = True):
        super().__init__()
        if not has_feature_output(backbone):
            raise ValueError(
                f"backbone {type(backbone).__name__} does not return its last feature map "
                "(forward(x, return_features=True)), which the uncertainty module reads"
            )
        self.backbone, self.uncertainty = backbone, uncertainty
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> ProbFaceNet:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, conv_final = self.backbone(x, return_features=True)
        return embedding, self.uncertainty(conv_final)
