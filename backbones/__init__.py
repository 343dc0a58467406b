"""Backbones: a normalised float batch (N, 3, H, W) -> un-normalised embedding (N, D)."""

from __future__ import annotations

from typing import Any

from torch import nn

from core.registry import Registry

BACKBONES = Registry("backbone")

# Importing the modules registers their architectures.
from backbones import inception_resnet, iresnet, mobilefacenet, resface, seresnext  # noqa: E402,F401


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("r50", embedding_size=512)``."""
    return BACKBONES.build(name, **kwargs)


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


__all__ = ["BACKBONES", "build_backbone", "list_backbones"]
