"""What a backbone must offer, written as code: the :class:`Backbone` protocol and its checks.

Every registered backbone (the built-in ones and a user's, registered from a ``custom_imports`` file) is
built by :func:`backbones.build_backbone` with the keyword arguments :data:`CONSTRUCTOR_ARGS`, all of them
from the config (``model.*``), and must then

* hold ``embedding_size`` (D) and ``input_size`` (the side of the square input) as attributes, equal to the
  values it was built with;
* map a normalised float batch (N, 3, input_size, input_size) to an un-normalised embedding (N, D):
  ``model(x)``;
* when it can give its last feature map (ProbFace's uncertainty module reads it), take
  ``forward(x, return_features=True)`` and return ``(embedding, features)``: the (N, D) embedding and the last
  map flattened to (N, F), from the same pass.

``precision`` (``fp32``, ``fp16``, ``bf16``) is the autocast of the network's body and ``grad_checkpoint``
asks it to recompute blocks in backward (``backbones.common`` has both); a backbone that cannot honour one of
them raises ``ValueError`` for it. :func:`check_factory` is checked before a backbone is built,
:func:`check_backbone` after; tests/test_contracts.py runs both and the forward contract for every one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from core.registry import ConfigError

# Keyword arguments train.py passes to every backbone (from model.embedding_size, model.dropout,
# model.precision, model.grad_checkpoint and model.input_size or data.image_size).
CONSTRUCTOR_ARGS = ("embedding_size", "dropout", "precision", "grad_checkpoint", "input_size")


@runtime_checkable
class Backbone(Protocol):
    """A face-recognition backbone: (N, 3, input_size, input_size) -> (N, embedding_size)."""

    embedding_size: int
    input_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


class BackboneContractError(ConfigError):
    """A registered backbone does not offer what :class:`Backbone` requires; the message names it and what
    is missing."""


def describe(name: str, factory: Callable[..., Any]) -> str:
    """``backbone 'name' (module.factory)``, for error messages."""
    where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__name__', factory)}"
    return f"backbone {name!r} ({where})"


def check_factory(name: str, factory: Callable[..., Any]) -> None:
    """Refuse a factory that does not take every one of :data:`CONSTRUCTOR_ARGS` by keyword."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): the call itself will say
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [arg for arg in CONSTRUCTOR_ARGS if arg not in params or params[arg].kind not in keyword]
    if missing:
        raise BackboneContractError(
            f"{describe(name, factory)} does not take the keyword argument{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)}; every backbone is built with {', '.join(CONSTRUCTOR_ARGS)} "
            "(backbones/contract.py)"
        )


def check_backbone(name: str, factory: Callable[..., Any], model: Any, built_with: dict[str, Any]) -> None:
    """Refuse a built backbone that is not an ``nn.Module``, lacks ``embedding_size`` or ``input_size``, or
    holds values other than those it was built with (``built_with``)."""
    what = describe(name, factory)
    if not isinstance(model, nn.Module):
        raise BackboneContractError(f"{what} built a {type(model).__name__}, not a torch.nn.Module")
    missing = [attr for attr in ("embedding_size", "input_size") if not hasattr(model, attr)]
    if missing:
        raise BackboneContractError(
            f"{what} has no attribute {' or '.join(missing)}; a backbone holds the embedding_size and "
            "input_size it was built with (backbones/contract.py)"
        )
    for attr in ("embedding_size", "input_size"):
        if attr in built_with and getattr(model, attr) != built_with[attr]:
            raise BackboneContractError(
                f"{what} was built with {attr}={built_with[attr]!r} but holds {attr}={getattr(model, attr)!r}"
            )


def has_feature_output(model: nn.Module) -> bool:
    """Whether ``model(x, return_features=True)`` returns ``(embedding, features)``."""
    return "return_features" in inspect.signature(model.forward).parameters
