"""Backbones: a normalised float batch (N, 3, H, W) -> un-normalised embedding (N, D).

What every backbone offers (constructor arguments, ``embedding_size``, ``input_size``, the feature map when
asked) is the :class:`~backbones.contract.Backbone` contract in ``backbones/contract.py``; a user's
backbone registered in :data:`BACKBONES` from a ``custom_imports`` file is held to it when built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.registry import Registry

BACKBONES = Registry("backbone")

# Importing the modules registers their architectures.
from backbones import inception_resnet, iresnet, mobilefacenet, resface, seresnext, vit  # noqa: E402,F401
from backbones.contract import (  # noqa: E402
    CONSTRUCTOR_ARGS,
    Backbone,
    BackboneContractError,
    check_backbone,
    check_factory,
)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("r50", embedding_size=512)``, and check it
    against the backbone contract (:class:`BackboneContractError` names what it lacks)."""
    factory = BACKBONES.get(name)
    check_factory(name, factory)
    model = factory(**kwargs)
    check_backbone(name, factory, model, kwargs)
    return model


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


__all__ = [
    "BACKBONES",
    "CONSTRUCTOR_ARGS",
    "Backbone",
    "BackboneContractError",
    "build_backbone",
    "list_backbones",
]
