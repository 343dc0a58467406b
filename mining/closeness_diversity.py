"""Stage 2 of the closeness-diversity method (docs/methods.md §3.8): a mined mini-batch every few steps.

On a mining step, each rank takes K / world classes present in its part of the batch; from the difficulty
scores it draws per class N_E easy images (score above the threshold tau, the 20th percentile of sampled
scores) and N_H hard ones (below tau), embeds them with the backbone (training transform, training mode)
and adds

    W_C * closeness(easy groups) + W_D * diversity(hard embeddings, prototypes)

where the prototypes are the (detached) class centres of the union of the selected classes' hard negative
classes: the top-N_P non-target classes, ranked by the head's cosines across all class shards, of one sample
per selected class (``prototype_rows="last"``: its last sample in this rank's batch, as the method's
released code keys its per-class lists by label, so a later sample of a class replaces an earlier one) or
of all its samples in the batch (``"all"``: more prototypes when classes repeat; docs/methods.md §3.8).
The auxiliary gradient of every rank is summed over ranks and divided by the world size
(the mean of the ranks' terms), then added to the step's gradient before the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.distributed import all_reduce, get_rank, get_world_size
from heads.partial_fc import PartialFC, ShardCosines
from losses.closeness_diversity import closeness_loss, diversity_loss
from mining.difficulty import DifficultyScores, EasyHardSampler


def is_mining_step(step: int, interval: int) -> bool:
    """Whether optimizer step ``step`` (0-based, counted over the whole run: stage 2 resumes stage 1's
    count) adds the mined terms, every ``interval`` steps from step 0 on (0, 5, 10, ... for 5), as the
    method's code does (``train.py`` l.147 ``global_step % interval == 0``, its ``global_step`` counted from
    0 and resumed at stage 1's last step + 1, l.97). ``interval`` <= 0: never."""
    return interval > 0 and step % interval == 0


@dataclass
class MinedTerms:
    closeness: float
    diversity: float
    threshold: float


class ClosenessDiversityMiner:
    """Args:
    positions: class id -> dataset positions of its images (``source.indices_per_identity()``).
    load: dataset positions -> uint8 image batch (the training transform of the current epoch); needed by
        :meth:`gradient` only.
    classes, num_easy, num_hard, negatives: K (over all ranks), N_E, N_H, N_P.
    weight_closeness, weight_diversity, scale: W_C, W_D and the diversity scale s.
    prototype_rows: whose hard negatives make the prototypes: ``last`` (the last sample of each selected
        class in this rank's batch) or ``all`` (every sample of it).
    """

    PROTOTYPE_ROWS = ("last", "all")

    def __init__(
        self,
        positions: dict[int, np.ndarray],
        load: Callable[[np.ndarray], torch.Tensor] | None = None,
        classes: int = 64,
        num_easy: int = 7,
        num_hard: int = 1,
        negatives: int = 500,
        weight_closeness: float = 0.5,
        weight_diversity: float = 1.0,
        percentile: float = 0.2,
        scale: float = 64.0,
        prototype_rows: str = "last",
    ) -> None:
        if num_easy < 2 or num_hard < 1:
            raise ValueError(
                f"closeness needs >= 2 easy images and diversity >= 1 hard, got {num_easy}, {num_hard}"
            )
        if prototype_rows not in self.PROTOTYPE_ROWS:
            choices = ", ".join(self.PROTOTYPE_ROWS)
            raise ValueError(f"mining.cd_prototypes must be one of {choices}, got {prototype_rows!r}")
        self.prototype_rows = prototype_rows
        self.sampler = EasyHardSampler(positions, num_easy=num_easy, num_hard=num_hard, percentile=percentile)
        self.load, self.classes, self.negatives = load, classes, negatives
        self.weight_closeness, self.weight_diversity, self.scale = weight_closeness, weight_diversity, scale

    def choose_classes(self, labels: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """K / world distinct classes of this rank's batch (all of them when there are fewer)."""
        present = np.unique(labels.cpu().numpy())
        count = min(len(present), max(1, self.classes // get_world_size()))
        return np.sort(rng.choice(present, size=count, replace=False))

    def prototypes(
        self,
        classifier: PartialFC,
        cosines: ShardCosines,
        selected: np.ndarray,
        labels: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Centres of the union of the selected classes' hard negatives, ranked by ``cosines``, the
        classifier's cosines of the global batch whose rank-local part is ``labels``."""
        negatives = classifier.top_negatives(cosines, self.negatives)  # (N global, N_P), every rank alike
        rows = get_rank() * len(labels) + self.prototype_samples(labels.cpu().numpy(), selected)
        union = torch.unique(negatives[rows.to(negatives.device)].flatten())
        union = union[(union >= 0) & ~torch.isin(union, torch.from_numpy(selected).to(union.device))]
        return classifier.gather_centres(union.to(device))

    def prototype_samples(self, labels: np.ndarray, selected: np.ndarray) -> torch.Tensor:
        """Positions in ``labels`` (this rank's batch) of the samples whose hard negatives are used."""
        if self.prototype_rows == "all":
            return torch.from_numpy(np.flatnonzero(np.isin(labels, selected)))
        last = len(labels) - 1 - np.unique(labels[::-1], return_index=True)[1]  # per sorted class
        return torch.from_numpy(np.sort(last[np.isin(np.unique(labels), selected)]))

    def gradient(
        self,
        backbone: nn.Module,
        classifier: PartialFC,
        cosines: ShardCosines,
        scores: DifficultyScores,
        labels: torch.Tensor,
        embed_input: Callable[[torch.Tensor], torch.Tensor],
        rng: np.random.Generator,
        loss_scale: float = 1.0,
    ) -> tuple[list[torch.Tensor], MinedTerms]:
        """Gradients of this rank's share of the mined loss for ``backbone``'s parameters, already summed
        over ranks (every rank must call this on the same steps). ``cosines``: the classifier's cosines of
        the global batch of this rank's ``labels`` (``PartialFC.scores(..., keep_cosines=True)``)."""
        selected = self.choose_classes(labels, rng)
        picked = self.sampler.sample(selected, scores.scores.cpu().numpy(), rng)
        easy, hard = picked["easy"], picked["hard"]
        if self.load is None:
            raise RuntimeError("ClosenessDiversityMiner: construct it with load= to mine images")
        images = self.load(np.concatenate([easy.ravel(), hard.ravel()]))
        embeddings = backbone(embed_input(images))
        n_easy = easy.size
        closeness = closeness_loss(embeddings[:n_easy].reshape(len(selected), easy.shape[1], -1))
        device = embeddings.device
        diversity = diversity_loss(
            embeddings[n_easy:], self.prototypes(classifier, cosines, selected, labels, device), self.scale
        )
        loss = (self.weight_closeness * closeness + self.weight_diversity * diversity) / get_world_size()
        params = [p for p in backbone.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
        summed = []
        for p, g in zip(params, grads, strict=True):  # summed over ranks here: DDP never sees them
            summed.append(all_reduce(torch.zeros_like(p) if g is None else g.contiguous(), "sum"))
        terms = MinedTerms(closeness.item(), diversity.item(), float(picked["threshold"]))
        return summed, terms
