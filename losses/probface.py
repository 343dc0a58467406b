"""ProbFace losses (docs/methods.md §3.11): mutual likelihood score, output constraint, attention distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
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
    """(N, N) a_ij = 2 (1 - cos(mu_i, mu_j)) / (sigma2_i + sigma2_j) for scalar sigma2 (N, 1)."""
    z = F.normalize(mu, dim=1)
    s = sigma2.view(-1)
    return 2.0 * (1.0 - z @ z.T) / (s.unsqueeze(0) + s.unsqueeze(1))
