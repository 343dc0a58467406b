"""MobileFaceNet (docs/methods.md §2.2) in arcface_torch's ``mbf`` layout, with the GDC embedding head.

Module names follow arcface_torch (``layers``, ``conv_sep``, ``features``), so its ``mbf`` checkpoints load
with ``strict=True`` (tested against a recorded layout of the reference).
"""

from __future__ import annotations

import torch
from torch import nn

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, fp32_head, run_block


class ConvBN(nn.Module):
    """conv - BN - PReLU (``act=False``: conv - BN, for projections), stored under ``layers``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.layers = nn.Sequential(conv, nn.BatchNorm2d(cout), *([nn.PReLU(cout)] if act else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted residual: 1x1 expand to ``expansion`` channels, 3x3 depthwise (stride), 1x1 project."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(cin, expansion),
            ConvBN(expansion, expansion, kernel=3, stride=stride, padding=1, groups=expansion),
            ConvBN(expansion, cout, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` residual depthwise blocks at constant width."""

    def __init__(self, channels: int, num_blocks: int, expansion: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, expansion, stride=1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution head: depthwise linear conv over the whole ``kernel`` x ``kernel`` map
    (7x7 for 112x112 inputs) - flatten - Linear (no bias) - BN1d."""

    def __init__(self, embedding_size: int, dropout: float, kernel: int = 7) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(512, 512, kernel=kernel, groups=512, act=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, flatten, fc, bn = self.layers
        return bn(fc(self.dropout(flatten(conv(x)))))


class MobileFaceNet(nn.Module):
    """MobileFaceNet with width multiplier ``scale`` and residual block counts ``blocks``.

    Args mirror :class:`backbones.iresnet.IResNet`: ``precision`` runs the body under autocast and the
    ``conv_sep`` + GDC head in fp32; ``grad_checkpoint`` recomputes each stage in backward;
    ``input_size`` (a multiple of 16, 112 for the standard crops) sets the GDC kernel to ``input_size/16``.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 (four stride-2 stages), got {input_size}")
        if len(blocks) != 4:
            raise ValueError(f"blocks must hold four residual block counts, got {blocks!r}")
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size
        c1, c2 = 64 * scale, 128 * scale
        # The expansion widths (128/256/512) are fixed in the reference layout, independent of `scale`.
        first = (
            ConvBN(c1, c1, kernel=3, padding=1, groups=64)
            if blocks[0] == 1
            else Residual(c1, blocks[0], expansion=128)
        )
        self.layers = nn.ModuleList(
            [
                ConvBN(3, c1, kernel=3, stride=2, padding=1),
                first,
                DepthWise(c1, c1, expansion=128, stride=2, residual=False),
                Residual(c1, blocks[1], expansion=128),
                DepthWise(c1, c2, expansion=256, stride=2, residual=False),
                Residual(c2, blocks[2], expansion=256),
                DepthWise(c2, c2, expansion=512, stride=2, residual=False),
                Residual(c2, blocks[3], expansion=256),
            ]
        )
        self.conv_sep = ConvBN(c2, 512)
        self.features = GDC(embedding_size, dropout, kernel=input_size // 16)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (N, 512, s/16, s/16): the ``conv_sep`` output the GDC head pools, in fp32."""
        with body_autocast(x, self.precision):
            for layer in self.layers:
                x = run_block(layer, x, self.grad_checkpoint)
        with fp32_head(x):
            return self.conv_sep(x.float())

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The embedding; with ``return_features`` also the flattened last map (``conv_final``) from the
        same pass, for ProbFace's uncertainty module."""
        conv_map = self.forward_features(x)
        with fp32_head(conv_map):
            embedding = self.features(conv_map)
        return (embedding, torch.flatten(conv_map, 1)) if return_features else embedding


@BACKBONES.register("mbf")
def mobilefacenet(**kwargs: object) -> MobileFaceNet:
    """MobileFaceNet, width 2, blocks (1, 4, 6, 2) (~0.45 GFLOPs, 2.06 M parameters)."""
    return MobileFaceNet(blocks=(1, 4, 6, 2), scale=2, **kwargs)  # type: ignore[arg-type]


@BACKBONES.register("mbf_large")
def mobilefacenet_large(**kwargs: object) -> MobileFaceNet:
    """MobileFaceNet, width 4, blocks (2, 8, 12, 4) (6.31 M parameters)."""
    return MobileFaceNet(blocks=(2, 8, 12, 4), scale=4, **kwargs)  # type: ignore[arg-type]
