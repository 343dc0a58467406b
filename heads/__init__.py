"""Margin heads: ``build_head(name, embedding_size=E, num_classes=C, **params)`` returns a module whose
``forward(embeddings, labels)`` gives the (N, C) logits already multiplied by the scale s."""

from __future__ import annotations

from typing import Any

from torch import nn

from heads import margin  # noqa: F401 - registers the heads
from heads.registry import HEADS


def build_head(name: str, embedding_size: int, num_classes: int, **params: Any) -> nn.Module:
    return HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **params)


def list_heads() -> list[str]:
    return HEADS.names()


__all__ = ["HEADS", "build_head", "list_heads"]
