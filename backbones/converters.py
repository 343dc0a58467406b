"""Backbone weights of other frameworks as checkpoints of this one.

* insightface arcface_torch ``model.pt``: a state dict in exactly our IResNet, MobileFaceNet or ViT layout
  (a DDP ``module.`` prefix is removed); RGB input.
* AdaFace (PyTorch Lightning ``.ckpt``): the backbone under ``state_dict`` with a ``model.`` prefix (the
  classifier under ``head.``, dropped), in AdaFace's IR naming (``input_layer``, ``body.N.res_layer``,
  ``output_layer``); BGR input. AdaFace's IR blocks are insightface's IBasicBlock (BN, conv, BN, PReLU,
  conv, BN) under other names, except two details converted exactly: a block whose channels do not
  change uses a strided 1x1 max-pool as its shortcut (here: a 1x1 convolution with identity weights and
  an identity BN), and the final BN1d has no affine parameters (here: weight 1, bias 0).

    python -m backbones.converters insightface model.pt out.pt --arch r100
    python -m backbones.converters adaface adaface_ir101_ms1mv2.ckpt out.pt --arch r100

The output is a checkpoint (``core.checkpoint``) with ``backbone`` and ``meta`` (architecture, embedding
size, colour order), which ``inference.py``, the evaluators and ``scripts/export_onnx.py`` read.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from backbones import build_backbone
from core.checkpoint import NORMALIZATION, CheckpointError, load_weights, save_checkpoint

BN_EPS = 1e-5
ADAFACE_RES = {"0": "bn1", "1": "conv1", "2": "bn2", "3": "prelu", "4": "conv2", "5": "bn3"}


class ConversionError(ValueError):
    """The weights do not have the layout the converter expects; the message names the key."""


def from_insightface(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arcface_torch backbone state dict (possibly saved from DDP) in our layout (the same keys)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _identity_bn(channels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """BatchNorm2d parameters that return their input in eval mode."""
    return {
        "weight": torch.ones(channels, dtype=dtype),
        "bias": torch.zeros(channels, dtype=dtype),
        "running_mean": torch.zeros(channels, dtype=dtype),
        "running_var": torch.full((channels,), 1.0 - BN_EPS, dtype=dtype),
        "num_batches_tracked": torch.tensor(0),
    }


def from_adaface(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """AdaFace IR backbone (Lightning ``model.`` prefix optional) -> our IResNet ``arch`` state dict."""
    source = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("head.")}
    target = build_backbone(arch).state_dict()
    blocks = [k[: -len(".bn1.weight")] for k in target if re.fullmatch(r"layer\d\.\d+\.bn1\.weight", k)]
    found = {int(m.group(1)) for k in source if (m := re.match(r"body\.(\d+)\.", k))}
    if found != set(range(len(blocks))):
        raise ConversionError(
            f"AdaFace weights hold {len(found)} IR blocks (body.N), backbone {arch!r} has {len(blocks)}"
        )
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for key, value in source.items():
            if key.startswith(src + "."):
                out[dst + key[len(src) :]] = value

    take("input_layer.0", "conv1")
    take("input_layer.1", "bn1")
    take("input_layer.2", "prelu")
    for i, block in enumerate(blocks):
        if not any(k.startswith(f"body.{i}.") for k in source):
            raise ConversionError(
                f"AdaFace weights have no body.{i}: not an IR network of {len(blocks)} blocks"
            )
        for index, name in ADAFACE_RES.items():
            take(f"body.{i}.res_layer.{index}", f"{block}.{name}")
        if f"{block}.downsample.0.weight" in target:
            if f"body.{i}.shortcut_layer.0.weight" in source:
                take(f"body.{i}.shortcut_layer.0", f"{block}.downsample.0")
                take(f"body.{i}.shortcut_layer.1", f"{block}.downsample.1")
            else:  # max-pool shortcut: a strided 1x1 identity convolution and an identity BN
                shape = target[f"{block}.downsample.0.weight"].shape
                if shape[0] != shape[1]:
                    raise ConversionError(
                        f"body.{i} keeps {shape[1]} channels, {block} of {arch!r} needs {shape[0]}"
                    )
                dtype = out[f"{block}.conv1.weight"].dtype
                out[f"{block}.downsample.0.weight"] = torch.eye(shape[0], dtype=dtype).reshape(shape)
                for key, value in _identity_bn(shape[0], dtype).items():
                    out[f"{block}.downsample.1.{key}"] = value
    take("output_layer.0", "bn2")
    take("output_layer.3", "fc")
    take("output_layer.4", "features")
    size = target["features.running_mean"].shape
    out.setdefault("features.weight", torch.ones(size, dtype=target["features.weight"].dtype))
    out.setdefault("features.bias", torch.zeros(size, dtype=target["features.bias"].dtype))
    missing = sorted(set(target) - set(out))
    if missing:
        raise ConversionError(f"AdaFace weights do not give {missing[0]} ({len(missing)} keys missing)")
    for key, value in out.items():
        if key not in target or target[key].shape != value.shape:
            expected = tuple(target[key].shape) if key in target else "no such key"
            raise ConversionError(f"{key}: shape {tuple(value.shape)} from AdaFace, expected {expected}")
    return out


def load_source(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a ``model.pt`` or Lightning ``.ckpt`` (its ``state_dict``), loaded without code."""
    state = load_weights(path)  # one-line errors naming the file; never unpickles code
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return state


def convert(source: str, path: str | os.PathLike[str], out: str | os.PathLike[str], arch: str) -> Path:
    """Convert ``path`` (``source`` insightface | adaface) to a checkpoint of backbone ``arch`` at ``out``."""
    state = load_source(path)
    converted = from_insightface(state) if source == "insightface" else from_adaface(state, arch)
    # the embedding's final BN: IResNet / MobileFaceNet ``features``, ViT ``feature.3``
    final_bn = next((k for k in ("features.running_mean", "feature.3.running_mean") if k in converted), None)
    if final_bn is None:
        raise ConversionError(f"{path}: no features.running_mean or feature.3.running_mean (embedding BN)")
    embedding_size = converted[final_bn].shape[0]
    model = build_backbone(arch, embedding_size=embedding_size)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"{path}: does not fit backbone {arch!r}: {err}") from None
    meta = {
        "arch": arch, "embedding_size": embedding_size, "input_size": 112,
        "color": "rgb" if source == "insightface" else "bgr", "normalization": NORMALIZATION,
        "source": f"{source}:{Path(path).name}",
    }  # fmt: skip
    return save_checkpoint(out, {"backbone": model.state_dict(), "meta": meta})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", choices=["insightface", "adaface"])
    parser.add_argument("weights", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", required=True, help="our backbone name: r18 ... r200, mbf, vit_t ... vit_h")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.weights, args.out, args.arch)
    except (ConversionError, CheckpointError, FileNotFoundError) as err:
        print(f"converters: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
