"""ResFace64 (docs/methods.md §2.4): the SphereFace-style 64-layer residual network ProbFace builds on.

Four stages at 64/128/256/512 channels; each opens with a 3x3 stride-2 conv and continues with 3/8/16/3
residual units of two 3x3 convs (``x + conv(conv(x))``, nothing after the addition). Every conv is
conv (no bias) - BN (eps 1e-3) - ReLU. An s x s input (96 in ProbFace) ends as a 512 x s/16 x s/16 map
(6 x 6). Flattened, that map is ProbFace's ``conv_final``; the embedding is dropout -> ``fc`` Linear
(512 (s/16)^2 -> D, no bias) -> ``features`` BN1d (eps 1e-3), D = 256 in ProbFace.

Interface for the ProbFace uncertainty module (docs/methods.md §3.11):

* ``model(x)`` -> embedding (N, D), un-normalised (heads normalise; ProbFace's mu is its unit vector);
* ``model(x, return_features=True)`` -> ``(embedding, conv_final)`` from one pass, ``conv_final`` the
  flattened last map (N, ``model.conv_final_dim``) in fp32, taken before the embedding's dropout (ProbFace
  trains the uncertainty module with the backbone frozen in inference mode, where dropout is inactive);
* ``model.forward_features(x)`` -> the last map (N, 512, s/16, s/16) only, in the body's precision.

The stage-opening convs and ``fc`` start from Xavier-uniform weights and the residual convs from a normal
(std 0.01, truncated at 2 std), as in ProbFace: each residual unit starts close to the identity, which
lets the 64-layer plain stack train without zero-initialised BN.
"""

from __future__ import annotations

import torch
from torch import nn

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, fp32_head, run_block

DEPTHS = {"resface64": (3, 8, 16, 3)}
WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-3  # ProbFace (TensorFlow slim batch_norm epsilon)


@torch.no_grad()
def _truncated_normal_(weight: torch.Tensor, std: float) -> None:
    """N(0, std^2) restricted to [-2 std, 2 std] (TensorFlow's truncated_normal), by redrawing the values
    outside; ``nn.init.trunc_normal_``'s inverse-CDF method is ~100x slower on CPU for these sizes."""
    flat = weight.view(-1).normal_(0.0, std)
    redraw = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while redraw.numel():
        values = torch.empty(redraw.numel(), dtype=flat.dtype).normal_(0.0, std)
        flat[redraw] = values
        redraw = redraw[values.abs() > 2 * std]


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias) - BN - ReLU, stored as ``conv``/``bn``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResFaceUnit(nn.Module):
    """``x + conv2(conv1(x))`` with two ConvBNReLU at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = ConvBNReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class ResFace(nn.Module):
    """SphereFace-style residual network; see the module docstring for the ProbFace interface.

    Args:
        layers: residual units per stage ((3, 8, 16, 3) for ResFace64).
        embedding_size: D (256 in ProbFace).
        dropout: dropout on the flattened map before ``fc``.
        precision: ``fp32``, or ``fp16``/``bf16`` to run the body under autocast; ``fc`` and the BN1d run
            in fp32, and ``conv_final`` is returned in fp32.
        grad_checkpoint: recompute each stage-opening conv / residual unit in backward.
        input_size: side of the square input, a multiple of 16 (96 for ProbFace's crops); sets the
            ``fc`` input to 512 (input_size/16)^2.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_size: int = 256,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 96,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size % 16 or input_size <= 0:
            raise ValueError(f"input_size must be a multiple of 16 (four stride-2 stages), got {input_size}")
        if len(layers) != 4:
            raise ValueError(f"layers must hold four residual unit counts, got {layers!r}")
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size
        cin = 3
        for stage, (units, width) in enumerate(zip(layers, WIDTHS, strict=True), start=1):
            modules = [ConvBNReLU(cin, width, stride=2), *(ResFaceUnit(width) for _ in range(units))]
            setattr(self, f"layer{stage}", nn.Sequential(*modules))
            cin = width
        self.conv_final_dim = WIDTHS[-1] * (input_size // 16) ** 2
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.conv_final_dim, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, ResFaceUnit):
                for conv in (m.conv1.conv, m.conv2.conv):
                    _truncated_normal_(conv.weight, std=0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            nn.init.xavier_uniform_(stage[0].conv.weight)
        nn.init.xavier_uniform_(self.fc.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> list[nn.Module]:
        """Stage-opening convs and residual units, input to output (the grad-checkpoint units)."""
        return [block for stage in self.stages for block in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (N, 512, s/16, s/16), in the body's precision."""
        with body_autocast(x, self.precision):
            for block in self.blocks():
                x = run_block(block, x, self.grad_checkpoint)
        return x

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        conv_final = torch.flatten(self.forward_features(x), 1).float()
        with fp32_head(conv_final):
            embedding = self.features(self.fc(self.dropout(conv_final)))
        return (embedding, conv_final) if return_features else embedding


@BACKBONES.register("resface64")
def resface64(**kwargs: object) -> ResFace:
    """ResFace64 (ProbFace): units (3, 8, 16, 3), 96x96 input, 256-d embedding; see :class:`ResFace`."""
    return ResFace(DEPTHS["resface64"], **kwargs)  # type: ignore[arg-type]
