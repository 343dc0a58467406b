"""ProbFace's training loss (docs/methods.md §3.11) as one registered loss: ``loss.name: probface``.

    L = mls_weight * L_MLS + constraint_weight * L_constraint + triplet_weight * L_triplet

* L_MLS: mean of -s(i, j) over the genuine pairs of the batch, mu detached (``losses.probface.mls_loss``);
* L_constraint: sum_i (sigma2_i / sg(mean sigma2) - 1)^2 (``l2``) or |.| (``l1``);
* L_triplet: semi-hard triplet loss (margin 3) on the attention distance, 2 (1 - cos(mu_i, mu_j)) /
  (sigma2_i + sigma2_j) for a scalar sigma2 and mean_d (mu_id - mu_jd)^2 / (sigma2_id + sigma2_jd) per
  dimension; mu detached as in L_MLS unless ``triplet_mu_gradient``
  (``losses.probface.attention_triplet_loss``).

Batches must hold several images per identity (PK sampling, ``data.sampler: pk``): without genuine pairs
there is no MLS term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from losses.probface import attention_triplet_loss, mls_loss, output_constraint
from losses.registry import LOSSES


@LOSSES.register("probface")
class ProbFaceLoss(nn.Module):
    """The ProbFace objective on ``((embedding, log_sigma2), labels)``; ``last_stats`` holds its terms.

    ``triplet_mu_gradient``: let the triplet term's gradient reach mu (and so a backbone trained with
    ``model.freeze_backbone: false``); ProbFace stops it, and with a frozen backbone it changes nothing.
    """

    def __init__(
        self,
        mls_weight: float = 1.0,
        constraint_weight: float = 0.001,
        constraint: str = "l2",
        triplet_weight: float = 0.001,
        triplet_margin: float = 3.0,
        triplet_mu_gradient: bool = False,
    ) -> None:
        super().__init__()
        if constraint not in ("l1", "l2"):
            raise ValueError(f"probface constraint must be 'l1' or 'l2', got {constraint!r}")
        self.mls_weight, self.constraint_weight, self.constraint = mls_weight, constraint_weight, constraint
        self.triplet_weight, self.triplet_margin = triplet_weight, triplet_margin
        self.triplet_mu_gradient = triplet_mu_gradient
        self.last_stats: dict[str, float] = {}

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, tuple) or len(outputs) != 2:
            raise TypeError("the probface loss takes (embedding, log_sigma2) from a model with uncertainty")
        # at least fp32 (an fp16 autocast body may hand over half precision)
        embedding, log_sigma2 = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in outputs)
        mu = F.normalize(embedding, dim=1)
        sigma2 = log_sigma2.exp()
        mls = mls_loss(mu, sigma2, labels)
        constraint = output_constraint(sigma2, self.constraint)
        triplet = torch.zeros((), device=mu.device)
        if self.triplet_weight:
            triplet = attention_triplet_loss(
                mu, sigma2, labels, self.triplet_margin, mu_gradient=self.triplet_mu_gradient
            )
        self.last_stats = {
            "mls": float(mls.detach()), "constraint": float(constraint.detach()),
            "triplet": float(triplet.detach()), "sigma2_mean": float(sigma2.detach().mean()),
        }  # fmt: skip
        return self.mls_weight * mls + self.constraint_weight * constraint + self.triplet_weight * triplet
