"""IResNet ("improved ResNet", docs/methods.md §2.1): the insightface arcface_torch backbone family.

State-dict keys and shapes are exactly arcface_torch's, so its released ``model.pt`` files load with
``strict=True`` (tested against a recorded layout of the reference r50 and r100).
"""

from __future__ import annotations

import torch
from torch import nn

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, fp32_head, run_block

DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN-conv-BN-PReLU-conv(stride)-BN, plus shortcut, no final ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet body + "BN-Dropout-FC-BN" embedding layer; returns the un-normalised embedding (N, D).

    Args:
        layers: blocks per stage (four stages of widths 64/128/256/512, each starting with stride 2).
        embedding_size: D.
        dropout: dropout before the FC (arcface_torch 0; AdaFace-style recipes 0.4).
        precision: ``fp32``, or ``fp16``/``bf16`` to run the convolutional body under autocast; the FC and
            the final BN always run in fp32 and the output is fp32.
        grad_checkpoint: recompute each block in the backward pass instead of keeping its activations
            (BN running statistics are updated once, as without checkpointing).
        input_size: side of the square input (a multiple of 16; 112 for the standard crops).
        zero_init_residual: start every residual branch at zero (its last BN weight = 0).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 (four stride-2 stages), got {input_size}")
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size

        self.conv1 = _conv3x3(3, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(WIDTHS[0])
        cin = WIDTHS[0]
        for stage, (blocks, width) in enumerate(zip(layers, WIDTHS, strict=True), start=1):
            stage_blocks = [
                IBasicBlock(cin if i == 0 else width, width, 2 if i == 0 else 1) for i in range(blocks)
            ]
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(WIDTHS[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(WIDTHS[-1] * (input_size // 16) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # arcface_torch's init: N(0, 0.1) convolutions, unit BN; the FC keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Zeroing the last BN of each residual branch makes every block start as its shortcut.
            # (arcface_torch zeroes the middle BN, bn2, which does not have that effect.)
            for block in self.blocks():
                nn.init.zeros_(block.bn3.weight)
        # The embedding BN only centres and learns a shift: its scale stays 1 (as in arcface_torch), so the
        # embedding norm that AdaFace/MagFace-style heads read is not rescaled by a learned factor.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> list[IBasicBlock]:
        """Every residual block, input to output."""
        return [block for stage in self.stages for block in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (N, 512, s/16, s/16) after ``bn2``, in the body's precision."""
        with body_autocast(x, self.precision):
            x = self.prelu(self.bn1(self.conv1(x)))
            for block in self.blocks():
                x = run_block(block, x, self.grad_checkpoint)
            return self.bn2(x)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The embedding; with ``return_features`` also the flattened last map (``conv_final``, fp32, before
        dropout) from the same pass, for ProbFace's uncertainty module."""
        conv_final = torch.flatten(self.forward_features(x), 1)
        with fp32_head(conv_final):
            embedding = self.features(self.fc(self.dropout(conv_final).float()))
        return (embedding, conv_final.float()) if return_features else embedding


def _make(name: str):
    def factory(**kwargs: object) -> IResNet:
        return IResNet(DEPTHS[name], **kwargs)  # type: ignore[arg-type]

    factory.__name__ = f"iresnet{name[1:]}"
    factory.__doc__ = f"IResNet-{name[1:]}, blocks per stage {DEPTHS[name]}; see :class:`IResNet`."
    return BACKBONES.register(name)(factory)


iresnet18 = _make("r18")
iresnet34 = _make("r34")
iresnet50 = _make("r50")
iresnet100 = _make("r100")
iresnet200 = _make("r200")
