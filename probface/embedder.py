"""ProbFace checkpoints as embedders: uint8 RGB faces -> (unit mu, sigma^2).

A ProbFace run of ``train.py`` writes the usual checkpoint (its ``backbone`` is the frozen recognition
network, so every evaluator and ``evaluation.embedders.load_embedder`` read mu from it as from any checkpoint)
plus ``uncertainty`` (the uncertainty module's state) and ``meta.uncertainty`` (``scalar`` or ``per_dim``).
The backbone comes out of the checkpoint as every embedder's does
(``evaluation.embedders.checkpoint_backbone``), and the pixels reach the network as they reach any other
(``TorchEmbedder.prepare``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from core.checkpoint import CheckpointError, load_checkpoint
from evaluation.embedders import TorchEmbedder, checkpoint_backbone
from evaluation.extract import extract, extract_dataset
from probface.fusion import fuse
from probface.model import ProbFaceNet, UncertaintyModule


class ProbFaceEmbedder(TorchEmbedder):
    """A :class:`ProbFaceNet` in eval mode; ``color`` is the order its backbone was trained on.
    ``embedder(images)`` -> ``(mu, sigma2)``: unit embeddings (N, D) and variances (N, 1) or (N, D)."""

    def __init__(self, net: ProbFaceNet, color: str = "rgb", device: str | torch.device = "cpu") -> None:
        super().__init__(net, color, device, input_size=getattr(net.backbone, "input_size", None))
        self.net = self.model
        self.embedding_size = int(net.backbone.embedding_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, log_sigma2 = self.net(self.prepare(images))
        return F.normalize(embedding.float(), dim=1).cpu(), log_sigma2.float().exp().cpu()

    def mu_embedder(self) -> TorchEmbedder:
        """A plain embedder of mu (un-normalised backbone output), for the other evaluators."""
        return TorchEmbedder(self.net.backbone, self.color, self.device)


def load_probface(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ProbFaceEmbedder:
    """The embedder of a ProbFace checkpoint written by ``train.py`` (``model.uncertainty`` set)."""
    state = load_checkpoint(path)
    meta = state.get("meta", {})
    if state.get("uncertainty") is None or meta.get("uncertainty") in (None, "none"):
        raise CheckpointError(
            f"{path}: holds no uncertainty module (train one with model.uncertainty: scalar, e.g. "
            "configs/recipes/probface.yaml)"
        )
    backbone, meta = checkpoint_backbone(path, state)
    in_features = state["uncertainty"]["fc1.weight"].shape[1]
    uncertainty = UncertaintyModule(in_features, meta["uncertainty"], meta["embedding_size"])
    uncertainty.load_state_dict(state["uncertainty"])
    return ProbFaceEmbedder(ProbFaceNet(backbone, uncertainty), meta["color"], device)


def _joined(embedder: ProbFaceEmbedder):
    """The embedder as one returning [mu, sigma2] side by side, for ``evaluation.extract``."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(embedder(images), dim=1)

    return embed


def _split(embedder: ProbFaceEmbedder, original: np.ndarray, flipped: np.ndarray | None):
    d = embedder.embedding_size
    if flipped is None:
        return original[:, :d], original[:, d:]
    return fuse(np.stack([original[:, :d], flipped[:, :d]]), np.stack([original[:, d:], flipped[:, d:]]))


def extract_uncertain(
    embedder: ProbFaceEmbedder, images: np.ndarray | torch.Tensor, batch_size: int = 128, flip: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(mu (N, D), sigma2 (N, S)) of ``images``; with ``flip`` each image and its horizontal flip are fused
    as a two-image template (``probface.fusion.fuse``: inverse-variance weights)."""
    return _split(embedder, *extract(_joined(embedder), images, batch_size, flip=flip))


def extract_uncertain_dataset(
    embedder: ProbFaceEmbedder,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 128,
    flip: bool = True,
    workers: int = 0,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_uncertain` over a dataset of uint8 (3, H, W) images read by ``workers`` processes."""
    joined = extract_dataset(_joined(embedder), dataset, batch_size, flip, workers, progress)
    return _split(embedder, *joined)
