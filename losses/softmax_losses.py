"""Losses on margin-head logits: cross-entropy, focal loss, the FRABSM mining weight
(docs/methods.md §3.7, §3.9).

All take logits (N, C), already multiplied by the head's scale, and int64 labels (N,). Each is a function of
the per-sample cross-entropy, exposed as ``reduce(ce, labels)``: the training loop feeds it the per-sample
CE that Partial FC computes across class shards, so every loss here works on a sharded classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.labels import check_labels
from losses.registry import LOSSES


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor, owner: str) -> torch.Tensor:
    """Checked per-sample cross-entropy in fp32 (fp64 when given)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        shapes = f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        raise ValueError(f"{owner}: {shapes} do not match")
    check_labels(owner, labels, logits.shape[1])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, reduction="none")


def inverse_log_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_c = 1 / log(1 + n_c), rescaled to sum to the number of classes (masked-face recipe)."""
    w = 1.0 / torch.log1p(counts.to(torch.float64))
    return (w * (len(counts) / w.sum())).to(torch.float32)


def _weighted_mean(
    per_sample: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None
) -> torch.Tensor:
    if class_weights is None:
        return per_sample.mean()
    w = class_weights.to(per_sample)[labels]
    return (w * per_sample).sum() / w.sum()


@LOSSES.register("cross_entropy")
class CrossEntropy(nn.Module):
    """Mean cross-entropy; with ``class_weights`` w: sum_i w_{y_i} CE_i / sum_i w_{y_i}."""

    def __init__(self, class_weights: torch.Tensor | list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.reduce(per_sample_ce(logits, labels, "cross_entropy"), labels)

    def reduce(self, ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss from per-sample cross-entropies ``ce`` (N,) of samples with ``labels`` (N,)."""
        return _weighted_mean(ce, labels, self.class_weights)


@LOSSES.register("focal")
class FocalLoss(CrossEntropy):
    """FL = weighted mean of (1 - p_i)^gamma CE_i with p_i = exp(-CE_i); the class weights act per sample
    (they multiply each term before the reduction), so different weightings give different losses."""

    def __init__(self, gamma: float = 2.0, class_weights: torch.Tensor | list[float] | None = None) -> None:
        super().__init__(class_weights)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.reduce(per_sample_ce(logits, labels, "focal"), labels)

    def reduce(self, ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        focal = (1.0 - torch.exp(-ce)).pow(self.gamma) * ce
        return _weighted_mean(focal, labels, self.class_weights)


@LOSSES.register("frabsm_weight")
class FRABSMLoss(nn.Module):
    """L = I(p) * CE with the probability-driven mining weight of FRABSM (docs/methods.md §3.7):

    I(p) = 1 + alpha (sigmoid(p0 - p) - 1/2) for 0 <= alpha <= 1, and 7 (1 + alpha (sigmoid(p0 - p) - 1/2)) /
    (7 + alpha) for alpha > 1. ``reduction="batch"`` (the released code): p = exp(-mean CE), one weight for
    the batch; ``"sample"``: p_i = exp(-CE_i), L = mean_i I(p_i) CE_i. p is not detached, so dI/dp is part
    of the gradient.
    """

    def __init__(self, alpha: float = 1.0, p0: float = 0.6, reduction: str = "batch") -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"frabsm alpha must be >= 0, got {alpha}")
        if reduction not in ("batch", "sample"):
            raise ValueError(f"frabsm reduction must be 'batch' or 'sample', got {reduction!r}")
        self.alpha, self.p0, self.reduction = alpha, p0, reduction

    def weight(self, p: torch.Tensor) -> torch.Tensor:
        base = 1.0 + self.alpha * (torch.sigmoid(self.p0 - p) - 0.5)
        return base if self.alpha <= 1.0 else 7.0 * base / (7.0 + self.alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.reduce(per_sample_ce(logits, labels, "frabsm_weight"), labels)

    def reduce(self, ce: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reduction == "batch":
            mean = ce.mean()
            return self.weight(torch.exp(-mean)) * mean
        return (self.weight(torch.exp(-ce)) * ce).mean()
