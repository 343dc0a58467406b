"""SE-ResNeXt (docs/methods.md §2.3) in timm's ``ResNet`` layout (``gluon_seresnext101_32x4d`` and relatives).

ImageNet ResNet stem (7x7/2 conv 3 -> 64, BN, ReLU, 3x3/2 max-pool), four stages of bottleneck blocks
(1x1 conv - BN - ReLU - grouped 3x3 conv carrying the stride - BN - ReLU - 1x1 conv to 4x the stage
width - BN - squeeze-excitation, added to the shortcut, ReLU). The bottleneck width is
``stage_width * base_width / 64 * cardinality`` (32x4d: 128/256/512/1024 at stages of 64/128/256/512,
outputs 256/512/1024/2048). SE: global average -> 1x1 conv (bias) to C/16 -> ReLU -> 1x1 conv (bias)
-> sigmoid gate. A shortcut that changes shape is a strided 1x1 conv + BN.

``forward_features`` returns the last map (2048 x 4 x 4 for 112x112 input); the embedding layer is
global pool (average, or GeM) -> dropout -> ``embedding`` Linear(2048 -> D, bias) -> ``features`` BN1d
(eps 1e-3). Body keys and shapes are timm's (tested against a layout transcribed from its source), so
timm's ImageNet weights load through :func:`from_timm`, which drops timm's 1000-class ``fc``. timm
itself is not used (it needs torchvision).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, run_block
from backbones.pooling import adopt_reference_state, global_pool, pooled_embedding

DEPTHS = {"seresnext101_32x4d": (3, 4, 23, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class SEModule(nn.Module):
    """Squeeze-excitation: per-channel gate sigmoid(fc2(relu(fc1(mean_hw x)))), fc = 1x1 conv with bias."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Bottleneck(nn.Module):
    """ResNeXt bottleneck with SE on the residual branch, timm's module names."""

    def __init__(self, cin: int, planes: int, stride: int, cardinality: int, base_width: int) -> None:
        super().__init__()
        width = planes * base_width // 64 * cardinality
        cout = planes * EXPANSION
        self.conv1 = nn.Conv2d(cin, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.se = SEModule(cout)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act3(out + shortcut)


class SEResNeXt(nn.Module):
    """SE-ResNeXt body + "Pool-Dropout-FC-BN" embedding layer; returns the un-normalised embedding (N, D).

    Args:
        layers: bottleneck blocks per stage ((3, 4, 23, 3) for 101 layers).
        cardinality, base_width: groups of the 3x3 convolution and channels per group at stage width 64
            (32x4d: 32 groups of 4).
        embedding_size: D.
        dropout: dropout between the pooling and the FC.
        precision: ``fp32``, or ``fp16``/``bf16`` to run the body under autocast; pooling, FC and BN1d
            always run in fp32.
        grad_checkpoint: recompute each bottleneck in backward instead of storing its activations.
        input_size: side of the square input (the network pools globally: any side >= 32; 112 here).
        pooling: ``avg`` or ``gem`` (learnable p, init 3; stored as ``global_pool.p``).
        residual_bn_init: initial weight of the last BN (``bn3``) of every residual branch. PyTorch's 1
            puts a fresh 101-layer network in the chaotic regime of deep residual nets: each of layer3's 23
            blocks adds a unit-variance random branch to the stream, so any small perturbation (bf16
            rounding, another convolution algorithm) grows through the depth, and in eval mode an fp32 and
            a bf16 pass of the same network disagree (embedding cosine ~0.75). timm zero-initialises it
            (every block starts as its shortcut, but the branch weights get no gradient until the BN weight
            has moved); the default 0.2 keeps the growth (1 + 0.2^2)^23 ~ 2.5 and trains every parameter
            from the first step.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        cardinality: int = 32,
        base_width: int = 4,
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
        pooling: str = "avg",
        residual_bn_init: float = 0.2,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 (five stride-2 steps), got {input_size}")
        if len(layers) != 4:
            raise ValueError(f"layers must hold four block counts, got {layers!r}")
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = 64
        for stage, (blocks, planes) in enumerate(zip(layers, STAGE_WIDTHS, strict=True), start=1):
            stride = 1 if stage == 1 else 2
            stage_blocks = []
            for i in range(blocks):
                stage_blocks.append(Bottleneck(cin, planes, stride if i == 0 else 1, cardinality, base_width))
                cin = planes * EXPANSION
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
        self.num_features = cin
        self.global_pool = global_pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.embedding = nn.Linear(cin, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-3)
        self._init_weights(residual_bn_init)

    def _init_weights(self, residual_bn_init: float) -> None:
        # timm's ResNet init: He (fan_out) convolutions, unit BN; Linear keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks():
            nn.init.constant_(block.bn3.weight, residual_bn_init)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> list[Bottleneck]:
        """Every bottleneck, input to output."""
        return [block for stage in self.stages for block in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (N, 2048, ceil(s/32), ceil(s/32)) of an s x s input, in the body's precision."""
        with body_autocast(x, self.precision):
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            for block in self.blocks():
                x = run_block(block, x, self.grad_checkpoint)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_features(x)
        return pooled_embedding(fmap, self.global_pool, self.dropout, self.embedding, self.features)


def from_timm(state: Mapping[str, torch.Tensor], model: SEResNeXt) -> dict[str, torch.Tensor]:
    """timm ``seresnext*_32x4d`` / ``gluon_seresnext*_32x4d`` ImageNet weights as a state dict for
    ``model``: timm's classifier ``fc.*`` is dropped and the embedding layer (``embedding``, ``features``)
    and a GeM exponent keep their initial values; any other key that does not fit raises ``ValueError``.

    Those weights expect ImageNet mean/std input; fine-tuning adapts them to this framework's
    ``(x/255 - 0.5)/0.5``.
    """
    return adopt_reference_state(
        state, model, "timm SE-ResNeXt", drop=("fc.",), keep=("embedding.", "features.")
    )


def _make(name: str):
    def factory(**kwargs: object) -> SEResNeXt:
        return SEResNeXt(DEPTHS[name], **kwargs)  # type: ignore[arg-type]

    factory.__name__ = name
    factory.__doc__ = f"SE-ResNeXt, 32x4d, blocks per stage {DEPTHS[name]}; see :class:`SEResNeXt`."
    return BACKBONES.register(name)(factory)


seresnext101_32x4d = _make("seresnext101_32x4d")


@BACKBONES.register("seresnext101_32x4d_gem")
def seresnext101_32x4d_gem(**kwargs: object) -> SEResNeXt:
    """SE-ResNeXt-101 32x4d with GeM pooling (learnable p, init 3) instead of the average pool."""
    return SEResNeXt(DEPTHS["seresnext101_32x4d"], pooling="gem", **kwargs)  # type: ignore[arg-type]
