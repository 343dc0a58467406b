"""Checkpoint converters: insightface model.pt and AdaFace Lightning .ckpt to our checkpoints, checked by
running the source network and ours on the same input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones import build_backbone
from backbones.converters import ConversionError, convert, from_adaface
from core.checkpoint import load_checkpoint
from evaluation.embedders import load_embedder


class AdaFaceBlock(nn.Module):
    """AdaFace's BasicBlockIR: res_layer BN, conv3x3, BN, PReLU, conv3x3 (stride), BN; shortcut max-pool
    (same channels) or conv1x1 + BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cin == cout:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR18(nn.Module):
    """AdaFace's IR-18 (key layout of its net.py), returning the un-normalised embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        blocks, cin = [], 64
        for cout in (64, 128, 256, 512):
            blocks += [AdaFaceBlock(cin, cout, 2), AdaFaceBlock(cout, cout, 1)]
            cin = cout
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(0.4), nn.Flatten(), nn.Linear(512 * 7 * 7, 512),
            nn.BatchNorm1d(512, affine=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def randomize(model: nn.Module) -> nn.Module:
    """Random weights and BN statistics, so that every mapped tensor matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=g) * 0.5 + 0.75 if "running_var" in name else None
                t.copy_(values if values is not None else torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def test_adaface_lightning_checkpoint_converts_exactly(tmp_path):
    source = randomize(AdaFaceIR18())
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in source.state_dict().items()},
                           "head.kernel": torch.zeros(512, 10)}, "epoch": 3}  # fmt: skip
    torch.save(ckpt, tmp_path / "adaface.ckpt")
    out = convert("adaface", tmp_path / "adaface.ckpt", tmp_path / "ours.pt", "r18")
    state = load_checkpoint(out)
    assert state["meta"]["color"] == "bgr" and state["meta"]["arch"] == "r18"
    ours = build_backbone("r18").eval()
    ours.load_state_dict(state["backbone"])
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), atol=1e-4, rtol=1e-4)
    # the embedder built from it feeds BGR, as AdaFace was trained
    images = torch.randint(
        0, 256, (2, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    embed = load_embedder(out)
    with torch.no_grad():
        expected = source((images.flip(1).float() / 127.5) - 1.0)
    torch.testing.assert_close(embed(images), expected, atol=1e-4, rtol=1e-4)


def test_insightface_model_pt_converts_with_or_without_ddp_prefix(tmp_path):
    model = randomize(build_backbone("r18"))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pt")
    out = convert("insightface", tmp_path / "model.pt", tmp_path / "ours.pt", "r18")
    state = load_checkpoint(out)
    assert state["meta"]["color"] == "rgb"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state["backbone"][key], value)


def test_wrong_layouts_are_named(tmp_path):
    source = AdaFaceIR18().state_dict()
    with pytest.raises(ConversionError, match=r"hold 8 IR blocks \(body\.N\), backbone 'r34' has 16"):
        from_adaface(source, "r34")
    broken = {k: v for k, v in source.items() if not k.startswith("output_layer.3")}
    with pytest.raises(ConversionError, match=r"do not give fc\.bias"):
        from_adaface(broken, "r18")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConversionError, match="not a state dict of tensors"):
        convert("insightface", tmp_path / "list.pt", tmp_path / "o.pt", "r18")
