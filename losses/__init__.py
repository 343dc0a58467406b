"""Losses: ``build_loss(name, **params)`` returns a module ``forward(logits_or_embeddings, labels) -> loss``.

Every loss is registered here, whatever is imported first: ``cross_entropy``, ``focal``, ``frabsm_weight``
(on head logits; each also ``reduce(ce, labels)`` on the per-sample cross-entropy that Partial FC computes),
``triplet`` (on embeddings) and ``probface`` (on ``(embedding, log_sigma2)``). The closeness/diversity terms
are functions of ``losses.closeness_diversity`` that the closeness-diversity miner adds. A user's loss
registered in :data:`LOSSES` from a ``custom_imports`` file is usable by name as well.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from losses import probface_loss, softmax_losses, triplet_loss  # noqa: F401 - registers the losses
from losses.registry import LOSSES


def build_loss(name: str, **params: Any) -> nn.Module:
    return LOSSES.build(name, **params)


def list_losses() -> list[str]:
    return LOSSES.names()


__all__ = ["LOSSES", "build_loss", "list_losses"]
