"""Global pooling of a feature map (N, C, H, W) -> (N, C): average, or generalised mean (GeM).

GeM (Radenović et al.) is ``(mean_hw clamp(x, eps)^p)^(1/p)`` per channel with a learnable exponent p:
p = 1 is the average, p -> inf approaches the maximum. docs/methods.md §2.3 uses it, p initialised to 3 and
eps 1e-6, in place of the final average pool of InceptionResNetV1 and SE-ResNeXt.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from backbones.common import fp32_head

POOLINGS = ("avg", "gem")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GeM(nn.Module):
    """Generalised-mean pooling (N, C, H, W) -> (N, C) with one exponent ``p`` shared by all channels.

    Args:
        p: initial exponent (> 0).
        eps: activations are clamped to at least ``eps`` before the power, so that ReLU zeros (and the
            occasional negative value of a network without a final ReLU) keep ``x^p`` and its gradient
            finite.
        learnable: ``p`` is a parameter (stored as ``p``, shape (1,)); otherwise a fixed buffer.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM exponent p must be positive, got {p}")
        if not eps > 0:
            raise ValueError(f"GeM eps must be positive, got {eps}")
        self.eps = eps
        value = torch.tensor([float(p)])
        if learnable:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g}, eps={self.eps}"


def global_pool(kind: str) -> nn.Module:
    """The pooling module for ``kind`` (``avg`` or ``gem``)."""
    if kind == "avg":
        return GlobalAvgPool()
    if kind == "gem":
        return GeM()
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {kind!r}")


def pooled_embedding(
    fmap: torch.Tensor, pool: nn.Module, dropout: nn.Module, fc: nn.Module, bn: nn.Module
) -> torch.Tensor:
    """The "Pool-Dropout-FC-BN" embedding layer of a globally pooled backbone, in fp32 whatever the body's
    precision (GeM's cube of an fp16 map overflows; the embedding feeds the margin softmax)."""
    with fp32_head(fmap):
        return bn(fc(dropout(pool(fmap.float()))))


def adopt_reference_state(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    source: str,
    drop: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A state dict of a reference network (same key names, average pooling) made ready for ``model``.

    A DDP ``module.`` prefix is removed and keys starting with ``drop`` (the reference's classifier) are
    left out. Entries of ``model`` under ``keep`` (a new embedding layer) and its GeM exponent, which a
    network trained with average pooling does not have, keep ``model``'s current values when the reference
    lacks them. Any other missing or extra key, or a shape that differs, raises a ``ValueError`` naming the
    key and ``source``.
    """
    out = {k.removeprefix("module."): v for k, v in state.items()}
    out = {k: v for k, v in out.items() if not (drop and k.startswith(drop))}
    expected = model.state_dict()
    for key, value in expected.items():
        if key.startswith(("global_pool.", *keep)) and key not in out:
            out[key] = value.detach().clone()
    missing = [k for k in expected if k not in out]
    extra = [k for k in out if k not in expected]
    if missing or extra:
        parts = [f"missing {len(missing)} keys (first {missing[0]!r})"] if missing else []
        parts += [f"{len(extra)} unexpected keys (first {extra[0]!r})"] if extra else []
        raise ValueError(f"{source} weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    for key, value in expected.items():
        if out[key].shape != value.shape:
            raise ValueError(
                f"{source} weights do not fit {type(model).__name__}: {key} has shape "
                f"{list(out[key].shape)}, expected {list(value.shape)}"
            )
    return out
