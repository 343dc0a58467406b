"""InceptionResNetV1 (docs/methods.md §2.3): the FaceNet network in facenet-pytorch's layout.

Stem (conv 3x3/2, 3x3, 3x3, max-pool 3x3/2, 1x1, 3x3, 3x3/2 to 256 channels) -> 5 x Block35 (residual
scale 0.17) -> Mixed_6a (to 896) -> 10 x Block17 (0.10) -> Mixed_7a (to 1792) -> 5 x Block8 (0.20) -> a
final Block8 without ReLU -> global pool (average, or GeM) -> dropout -> ``last_linear`` 1792 -> D (no bias)
-> ``last_bn`` (BN1d, eps 1e-3). Every convolution except the residual 1x1 projections is conv (no bias) -
BN (eps 1e-3) - ReLU.

State-dict keys and shapes are facenet-pytorch's (tested against a layout recorded from its source), so
its VGGFace2 / CASIA-WebFace weights load through :func:`from_facenet_pytorch`, which drops the
classifier (``logits.*``) those files also hold.

facenet-pytorch L2-normalises its output. Here the forward returns the un-normalised ``last_bn`` output
by default, as every backbone of this framework does: the margin heads normalise internally and
AdaFace/MagFace/FRABSM-style heads and norm-weighted flip fusion need the norm, which normalising would
erase. ``normalize_output=True`` gives facenet-pytorch's unit vectors (for using the network as a
stand-alone embedder); it does not change the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, run_block
from backbones.pooling import adopt_reference_state, global_pool, pooled_embedding

BN_EPS = 1e-3  # facenet-pytorch's value, from the TensorFlow original
MIN_INPUT = 75  # smallest side for which Mixed_7a still sees a 3x3 map


class BasicConv2d(nn.Module):
    """conv (no bias) - BN (eps 1e-3) - ReLU, stored as ``conv``/``bn``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _chain(*specs: tuple) -> nn.Module:
    """One BasicConv2d for one spec, else an ``nn.Sequential`` of them (facenet-pytorch's branch layout)."""
    convs = [BasicConv2d(*spec) for spec in specs]
    return convs[0] if len(convs) == 1 else nn.Sequential(*convs)


class InceptionResidual(nn.Module):
    """Parallel branches -> concat -> 1x1 conv (with bias) back to ``channels`` -> ``x + scale * that``
    -> ReLU (none for the network's last block). Branches are stored as ``branch0``, ``branch1``, ..."""

    def __init__(self, branches: Sequence[nn.Module], concat: int, channels: int, scale: float, relu: bool):
        super().__init__()
        self.scale = scale
        self.num_branches = len(branches)
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)
        self.conv2d = nn.Conv2d(concat, channels, kernel_size=1)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.num_branches)], dim=1)
        return self.relu(x + self.scale * self.conv2d(out))


class Reduction(nn.Module):
    """Parallel stride-2 branches (the last one a 3x3/2 max-pool) concatenated: Mixed_6a / Mixed_7a."""

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        self.num_branches = len(branches)
        for i, branch in enumerate(branches):
            self.add_module(f"branch{i}", branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.num_branches)], dim=1)


def block35(scale: float = 0.17) -> InceptionResidual:
    """Inception-ResNet-A at 256 channels (35x35 in the 299-pixel original)."""
    branches = [
        _chain((256, 32, 1)),
        _chain((256, 32, 1), (32, 32, 3, 1, 1)),
        _chain((256, 32, 1), (32, 32, 3, 1, 1), (32, 32, 3, 1, 1)),
    ]
    return InceptionResidual(branches, 96, 256, scale, relu=True)


def block17(scale: float = 0.10) -> InceptionResidual:
    """Inception-ResNet-B at 896 channels, with factorised 1x7 / 7x1 convolutions."""
    branches = [
        _chain((896, 128, 1)),
        _chain((896, 128, 1), (128, 128, (1, 7), 1, (0, 3)), (128, 128, (7, 1), 1, (3, 0))),
    ]
    return InceptionResidual(branches, 256, 896, scale, relu=True)


def block8(scale: float = 0.20, relu: bool = True) -> InceptionResidual:
    """Inception-ResNet-C at 1792 channels, with factorised 1x3 / 3x1 convolutions."""
    branches = [
        _chain((1792, 192, 1)),
        _chain((1792, 192, 1), (192, 192, (1, 3), 1, (0, 1)), (192, 192, (3, 1), 1, (1, 0))),
    ]
    return InceptionResidual(branches, 384, 1792, scale, relu=relu)


def mixed_6a() -> Reduction:
    """256 -> 384 + 256 + 256 = 896 channels, stride 2."""
    return Reduction(
        [
            _chain((256, 384, 3, 2)),
            _chain((256, 192, 1), (192, 192, 3, 1, 1), (192, 256, 3, 2)),
            nn.MaxPool2d(3, stride=2),
        ]
    )


def mixed_7a() -> Reduction:
    """896 -> 384 + 256 + 256 + 896 = 1792 channels, stride 2."""
    return Reduction(
        [
            _chain((896, 256, 1), (256, 384, 3, 2)),
            _chain((896, 256, 1), (256, 256, 3, 2)),
            _chain((896, 256, 1), (256, 256, 3, 1, 1), (256, 256, 3, 2)),
            nn.MaxPool2d(3, stride=2),
        ]
    )


class InceptionResNetV1(nn.Module):
    """InceptionResNetV1 body + pooled "Dropout-FC-BN" embedding layer; returns (N, D).

    Args:
        embedding_size: D (512 in facenet-pytorch's released weights).
        dropout: dropout before ``last_linear`` (facenet-pytorch 0.6; the masked-FR recipes 0.3-0.4,
            docs/methods.md §2.3).
        precision: ``fp32``, or ``fp16``/``bf16`` to run the convolutional body under autocast; pooling,
            ``last_linear`` and ``last_bn`` always run in fp32 (GeM's cube overflows fp16).
        grad_checkpoint: recompute each stem layer / inception block in backward instead of storing its
            activations.
        input_size: side of the square input; the network pools globally, so any side >= 75 works
            (112 for this framework's crops, 160 for facenet-pytorch's MTCNN crops). Checked here only.
        pooling: ``avg`` (facenet-pytorch) or ``gem`` (learnable p, init 3; stored as ``global_pool.p``).
        normalize_output: return unit vectors as facenet-pytorch does (default off: heads normalise
            and some need the norm).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
        pooling: str = "avg",
        normalize_output: bool = False,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size < MIN_INPUT:
            raise ValueError(
                f"input_size must be at least {MIN_INPUT} for InceptionResNetV1, got {input_size}"
            )
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.normalize_output = normalize_output

        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(block35() for _ in range(5)))
        self.mixed_6a = mixed_6a()
        self.repeat_2 = nn.Sequential(*(block17() for _ in range(10)))
        self.mixed_7a = mixed_7a()
        self.repeat_3 = nn.Sequential(*(block8() for _ in range(5)))
        self.block8 = block8(scale=1.0, relu=False)
        self.global_pool = global_pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(1792, embedding_size, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding_size, eps=BN_EPS, momentum=0.1)
        self._init_weights()

    def _init_weights(self) -> None:
        # He (fan_in) convolutions keep a fresh network's activations at unit scale. PyTorch's default, which
        # facenet-pytorch keeps, shrinks them ~3x per layer: in eval mode before any training the maps of
        # the deep blocks reach denormal floats, which CPUs process orders of magnitude slower.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def blocks(self) -> list[nn.Module]:
        """The body, input to output: stem layers, then inception blocks (the grad-checkpoint units)."""
        stem = [self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a]
        stem += [self.conv2d_3b, self.conv2d_4a, self.conv2d_4b]
        return [
            *stem,
            *self.repeat_1,
            self.mixed_6a,
            *self.repeat_2,
            self.mixed_7a,
            *self.repeat_3,
            self.block8,
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, 1792, h, w), h = w = 2 for 112x112 input (in the body's precision)."""
        with body_autocast(x, self.precision):
            for block in self.blocks():
                x = run_block(block, x, self.grad_checkpoint)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_features(x)
        x = pooled_embedding(fmap, self.global_pool, self.dropout, self.last_linear, self.last_bn)
        return F.normalize(x, dim=1) if self.normalize_output else x


def from_facenet_pytorch(
    state: Mapping[str, torch.Tensor], model: InceptionResNetV1
) -> dict[str, torch.Tensor]:
    """facenet-pytorch ``InceptionResnetV1`` weights (e.g. ``20180402-114759-vggface2.pt``) as a state dict
    for ``model``: the identity classifier ``logits.*`` is dropped, a GeM exponent keeps its initial value,
    anything else that does not fit raises ``ValueError`` naming the key."""
    return adopt_reference_state(state, model, "facenet-pytorch InceptionResnetV1", drop=("logits.",))


@BACKBONES.register("inception_resnet_v1")
def inception_resnet_v1(**kwargs: object) -> InceptionResNetV1:
    """InceptionResNetV1 (FaceNet, facenet-pytorch layout), average pool; see :class:`InceptionResNetV1`."""
    return InceptionResNetV1(**kwargs)  # type: ignore[arg-type]


@BACKBONES.register("inception_resnet_v1_gem")
def inception_resnet_v1_gem(**kwargs: object) -> InceptionResNetV1:
    """InceptionResNetV1 with GeM pooling (learnable p, init 3) instead of the final average pool."""
    return InceptionResNetV1(pooling="gem", **kwargs)  # type: ignore[arg-type]
