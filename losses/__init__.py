"""Losses: ``build_loss(name, **params)`` returns a module ``forward(logits_or_embeddings, labels) -> loss``.

Registered: ``cross_entropy``, ``focal``, ``frabsm_weight`` (on head logits) and ``triplet`` (on embeddings).
The closeness/diversity and ProbFace terms are functions in their modules.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from losses import softmax_losses, triplet_loss  # noqa: F401 - registers the losses
from losses.registry import LOSSES


def build_loss(name: str, **params: Any) -> nn.Module:
    return LOSSES.build(name, **params)


def list_losses() -> list[str]:
    return LOSSES.names()


__all__ = ["LOSSES", "build_loss", "list_losses"]
