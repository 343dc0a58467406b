"""Per-image difficulty scores and the easy/hard sampler of the closeness-diversity method
(docs/methods.md §3.8).

The score d_i of training image i is an EMA of its target cosine, d_i <- 0.9 d_i + 0.1 cos(theta_y)
(higher = easier). Every rank sees the (index, cosine) pairs of the whole global batch, so the score
arrays stay identical on all ranks without the dilution that averaging separately-updated arrays causes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.distributed import all_gather_padded


class DifficultyScores(nn.Module):
    """EMA target-cosine score per training image, kept in a buffer (saved with checkpoints)."""

    def __init__(self, num_images: int, momentum: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.momentum = momentum
        # U(0, 1) start, as the method's stage 1 does, until real cosines replace it
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("scores", torch.rand(num_images, generator=g, dtype=torch.float32))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, target_cos: torch.Tensor) -> None:
        """Fold the target cosines of images ``indices`` (this rank's batch) into every rank's scores."""
        if indices.shape != target_cos.shape or indices.ndim != 1:
            raise ValueError(
                f"indices {tuple(indices.shape)} and target_cos {tuple(target_cos.shape)} must match"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.scores.numel()):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise ValueError(f"image index {bad} outside [0, {self.scores.numel()})")
        all_idx = torch.cat(all_gather_padded(indices.to(self.scores.device, torch.long)))
        all_cos = torch.cat(all_gather_padded(target_cos.detach().to(self.scores)))
        # an image twice in one global batch: the EMA takes the mean of its cosines once
        unique, inverse = torch.unique(all_idx, return_inverse=True)
        sums = torch.zeros(unique.numel(), dtype=all_cos.dtype, device=all_cos.device).index_add_(
            0, inverse, all_cos
        )
        counts = torch.bincount(inverse, minlength=unique.numel()).to(all_cos.dtype)
        self.scores[unique] = self.momentum * self.scores[unique] + (1 - self.momentum) * sums / counts


class EasyHardSampler:
    """Picks easy and hard images of chosen classes from the difficulty scores (stage 2 of the method).

    Threshold tau = the ``percentile`` (0.2) of ``num_probe`` scores drawn with replacement. Per class,
    ``num_easy`` images with score in (tau, 1) and ``num_hard`` with score in (0, tau); an interval without
    enough candidates widens by ``widen`` per side until it has them, and samples repeat if it never does.
    """

    def __init__(
        self,
        positions: dict[int, np.ndarray],
        num_easy: int = 7,
        num_hard: int = 1,
        percentile: float = 0.2,
        num_probe: int = 100_000,
        widen: float = 0.05,
    ) -> None:
        self.positions = positions  # class id -> dataset positions of its images (indices_per_identity())
        self.num_easy, self.num_hard = num_easy, num_hard
        self.percentile, self.num_probe, self.widen = percentile, num_probe, widen

    def threshold(self, scores: np.ndarray, rng: np.random.Generator) -> float:
        probe = rng.choice(scores, size=self.num_probe, replace=True)
        return float(np.quantile(probe, self.percentile))

    def pick(self, scores: np.ndarray, low: float, high: float, members: np.ndarray, count: int,
             rng: np.random.Generator) -> np.ndarray:  # fmt: skip
        """``count`` members with score in (low, high), widening the interval until there are enough."""
        member_scores = scores[members]
        while True:
            candidates = members[(member_scores > low) & (member_scores < high)]
            if len(candidates) >= count or (low <= -1.0 and high >= 1.0):
                break
            low, high = low - self.widen, high + self.widen
        if len(candidates) == 0:
            candidates = members
        return rng.choice(candidates, size=count, replace=len(candidates) < count)

    def sample(
        self, classes: np.ndarray, scores: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Image indices ``easy`` (len(classes), num_easy) and ``hard`` (len(classes), num_hard)."""
        tau = self.threshold(scores, rng)
        easy, hard = [], []
        for c in classes:
            members = self.positions[int(c)]
            easy.append(self.pick(scores, tau, 1.0, members, self.num_easy, rng))
            hard.append(self.pick(scores, 0.0, tau, members, self.num_hard, rng))
        return {"threshold": np.float64(tau), "easy": np.stack(easy), "hard": np.stack(hard)}


@torch.no_grad()
def top_negative_classes(cos: torch.Tensor, labels: torch.Tensor, k: int = 500) -> torch.Tensor:
    """Per sample, the ``k`` non-target classes with the highest cosine (the hard negatives whose centres
    become diversity prototypes). ``cos``: (N, C) cosines; returns (N, min(k, C - 1)) class ids."""
    masked = cos.detach().clone()
    masked.scatter_(1, labels.unsqueeze(1), float("-inf"))
    return masked.topk(min(k, cos.shape[1] - 1), dim=1).indices
