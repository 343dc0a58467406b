"""ProbFace losses (docs/methods.md §3.11): mutual likelihood score, output constraint, and the attention
distance with its semi-hard triplet term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.triplet_loss import triplet_from_distances


def mutual_likelihood_score(
    mu1: torch.Tensor, mu2: torch.Tensor, sigma2_1: torch.Tensor, sigma2_2: torch.Tensor
) -> torch.Tensor:
    """s(i, j) for unit embeddings ``mu`` (N, D) and variances ``sigma2`` (N, 1) (scalar) or (N, D).

    Scalar: -[2 (1 - mu_i . mu_j) / (s_i + s_j) + log(s_i + s_j)]; per dimension: -mean_d[(mu_id - mu_jd)^2 /
    (s_id + s_jd) + log(s_id + s_jd)].
    """
    total = sigma2_1 + sigma2_2
    if sigma2_1.shape[-1] == 1:
        total = total.squeeze(-1)
        return -(2.0 * (1.0 - (mu1 * mu2).sum(-1)) / total + torch.log(total))
    return -((mu1 - mu2).pow(2) / total + torch.log(total)).mean(-1)


def pairwise_mls(mu: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """(N, N) matrix of mutual likelihood scores of a batch."""
    n = mu.shape[0]
    index = torch.arange(n, device=mu.device)
    i, j = torch.meshgrid(index, index, indexing="ij")
    return mutual_likelihood_score(
        mu[i.flatten()], mu[j.flatten()], sigma2[i.flatten()], sigma2[j.flatten()]
    ).view(n, n)


def mls_loss(mu: torch.Tensor, sigma2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -s(i, j) over genuine pairs i != j; mu is detached (only the uncertainty learns)."""
    scores = pairwise_mls(F.normalize(mu.detach(), dim=1), sigma2)
    diagonal = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    genuine = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~diagonal
    if not genuine.any():
        raise ValueError("mls_loss needs at least one pair of images of the same identity in the batch")
    return -scores[genuine].mean()


def output_constraint(sigma2: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """sum_i (sigma2_i / sg(mean sigma2) - 1)^2 (``l2``) or |.| (``l1``): keeps sigma2 near its mean."""
    ratio = sigma2 / sigma2.mean().detach() - 1.0
    if kind == "l2":
        return ratio.pow(2).sum()
    if kind == "l1":
        return ratio.abs().sum()
    raise ValueError(f"output constraint kind must be 'l1' or 'l2', got {kind!r}")


def attention_distance(mu: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """(N, N) attention distances of ``mu`` (N, D; normalised here) for sigma2 (N, 1) or (N, D).

    Scalar: a_ij = 2 (1 - cos(mu_i, mu_j)) / (s_i + s_j); per dimension: a_ij = mean_d (mu_id - mu_jd)^2 /
    (s_id + s_jd). The per-dimension form averages over the D dimensions as the MLS does (and as ProbFace's
    release does), so with sigma^2 near its initial e^-7 its distances are of the order of the margin 3 and
    not D times larger.
    """
    z = F.normalize(mu, dim=1)
    if sigma2.shape[1] == 1:
        s = sigma2.view(-1)
        return 2.0 * (1.0 - z @ z.T) / (s.unsqueeze(0) + s.unsqueeze(1))
    return ((z.unsqueeze(1) - z.unsqueeze(0)).pow(2) / (sigma2.unsqueeze(1) + sigma2.unsqueeze(0))).mean(-1)


def attention_triplet_loss(
    mu: torch.Tensor,
    sigma2: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 3.0,
    mu_gradient: bool = False,
) -> torch.Tensor:
    """ProbFace's discriminative term: the semi-hard triplet loss (``losses.triplet_loss``) on the attention
    distance. mu is detached unless ``mu_gradient``: only sigma^2 learns from it, as in ProbFace, whose
    backbone is frozen."""
    mu = mu if mu_gradient else mu.detach()
    return triplet_from_distances(attention_distance(mu, sigma2), labels, margin, "semi_hard")[0]
