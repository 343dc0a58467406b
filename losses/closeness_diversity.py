"""Closeness and diversity losses of the two-stage closeness-diversity method (docs/methods.md §3.8)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def closeness_loss(easy: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the mean squared distance between all unordered pairs of the class's
    L2-normalised easy embeddings. ``easy``: (K classes, N_E images, E)."""
    if easy.ndim != 3 or easy.shape[1] < 2:
        raise ValueError(f"closeness needs (classes, >= 2 images, dim) embeddings, got {tuple(easy.shape)}")
    z = F.normalize(easy, dim=2)
    d2 = torch.cdist(z, z).pow(2)  # (K, N, N)
    n = easy.shape[1]
    pairs = torch.triu_indices(n, n, offset=1, device=easy.device)
    return d2[:, pairs[0], pairs[1]].mean(dim=1).mean()


def diversity_loss(hard: torch.Tensor, prototypes: torch.Tensor, s: float = 64.0) -> torch.Tensor:
    """Mean over hard embeddings h of log(mean_p exp(s * max(0, cos(h, p))^2)) over the (detached)
    prototypes of their hard negative classes. ``hard``: (H, E); ``prototypes``: (P, E)."""
    if prototypes.numel() == 0:
        raise ValueError("diversity needs at least one prototype")
    cos = F.normalize(hard, dim=1) @ F.normalize(prototypes.detach(), dim=1).T
    energy = s * cos.clamp(min=0).pow(2)
    return (torch.logsumexp(energy, dim=1) - math.log(cos.shape[1])).mean()


def diversity_prototypes(
    weight: torch.Tensor, hard_negatives: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """Class centres of the union of the selected classes' hard negative classes, without the selected
    classes themselves. ``hard_negatives``: (K, N_P) class ids from the head's top-N_P non-targets."""
    union = torch.unique(hard_negatives.flatten())
    keep = union[~torch.isin(union, selected)]
    return weight.detach()[keep]
