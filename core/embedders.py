"""Embedders from files: a checkpoint of ours, an insightface ``model.pt`` state dict, or an ONNX model.

An embedder maps a uint8 RGB batch (N, 3, 112, 112) to float32 features (N, D); each knows the colour order
its network expects and converts on the way in, so callers always hand over RGB.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones import build_backbone
from backbones.common import PRECISIONS, check_precision
from core.checkpoint import load_checkpoint
from data.transforms import normalize_batch


class TorchEmbedder:
    """A backbone, put in eval mode; ``color`` is the order its network was trained on; ``channels_last``
    feeds the input in that memory format (for a model converted to it).

    ``precision`` runs the network under autocast: ``fp32`` (none), ``bf16`` or ``fp16``; the backbones keep
    their embedding layer (FC + BN) in fp32 under it, as in training. It applies on any device it is asked
    for (CPU autocast supports bf16), so a CPU run stays fp32 unless told otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        color: str = "rgb",
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        precision: str = "fp32",
    ) -> None:
        check_precision(precision)
        self.model, self.color, self.device = model.eval().to(device), color, torch.device(device)
        self.channels_last, self.precision = channels_last, precision

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        x = normalize_batch(x, self.color, getattr(self.model, "input_size", None))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        with nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype):
            return self.model(x).float().cpu()


class OnnxEmbedder:
    """An ONNX model run by onnxruntime on ``(x - 127.5) / 127.5`` input in ``color`` order (the
    insightface convention; the colour comes from the model's ``color`` metadata when it has one)."""

    def __init__(self, path: str | os.PathLike[str], color: str | None = None) -> None:
        import onnxruntime

        self.path, self.precision = Path(path), "fp32"
        self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.color = color or meta.get("color", "rgb")
        self.input = self.session.get_inputs()[0].name
        side = self.session.get_inputs()[0].shape[-1]
        self.input_size = side if isinstance(side, int) else None  # faces are resized to a fixed input

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize_batch(torch.as_tensor(images), self.color, self.input_size).numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input: x})[0], dtype=np.float32))


def load_embedder(
    path: str | os.PathLike[str],
    backbone: str | None = None,
    color: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> TorchEmbedder | OnnxEmbedder:
    """An embedder for ``path``: ``.onnx`` files run with onnxruntime; a checkpoint of this framework
    carries its architecture and colour; any other state dict (insightface ``model.pt``) needs
    ``backbone`` (and ``color``, default rgb). ``precision`` (fp32 | bf16 | fp16) is the autocast of a
    PyTorch model (see :class:`TorchEmbedder`); ONNX models run as exported."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    check_precision(precision)
    if path.suffix == ".onnx":
        if precision != "fp32":
            raise ValueError(f"{path}: precision {precision} is for PyTorch models; ONNX runs as exported")
        return OnnxEmbedder(path, color)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format_version" in state:
        state = load_checkpoint(path)
        meta = state["meta"]
        model = build_backbone(
            meta["arch"], embedding_size=meta["embedding_size"], input_size=meta["input_size"]
        )
        model.load_state_dict(state["backbone"])
        return TorchEmbedder(model, color or meta["color"], device, precision=precision)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: neither a checkpoint of this framework nor a backbone state dict")
    if backbone is None:
        raise ValueError(f"{path}: a plain state dict; name its architecture (--backbone r50, ...)")
    embedding_size = next(
        (v.shape[0] for k, v in state.items() if k.startswith("features.") and v.ndim == 1), 512
    )
    model = build_backbone(backbone, embedding_size=int(embedding_size))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: does not fit backbone {backbone!r}: {err}") from None
    return TorchEmbedder(model, color or "rgb", device, precision=precision)


# ------------------------------------------------------------------------------- command-line helpers


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_embedder_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every evaluator takes: ``--model --backbone --color --device --precision``."""
    parser.add_argument("--model", type=Path, required=True, help="checkpoint, insightface model.pt or .onnx")
    parser.add_argument("--backbone", help="architecture of a plain state dict (r50, r100, mbf, ...)")
    parser.add_argument(
        "--color", choices=("rgb", "bgr"), help="colour order the model expects (default: its own)"
    )
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32",
        help="autocast of a PyTorch model; bf16/fp16 are faster on GPU (default: fp32)",
    )  # fmt: skip


def embedder_from_args(args: argparse.Namespace) -> TorchEmbedder | OnnxEmbedder:
    """The embedder named by the options of :func:`add_embedder_arguments`."""
    return load_embedder(args.model, args.backbone, args.color, args.device, args.precision)


def embedder_key(path: str | os.PathLike[str], embedder: TorchEmbedder | OnnxEmbedder) -> str:
    """A name for cached features: the model file (name, size, mtime), its colour and its precision."""
    stat = Path(path).stat()
    key = f"{Path(path).stem}_{stat.st_size}_{int(stat.st_mtime)}_{embedder.color}"
    return key if embedder.precision == "fp32" else f"{key}_{embedder.precision}"


def run_settings(args: argparse.Namespace, embedder: TorchEmbedder | OnnxEmbedder, **extra: object) -> dict:
    """The switches behind an evaluator's numbers, for its printout and its JSON: the model, its colour
    order and precision, and the run's ``fusion``, ``batch_size`` and ``workers`` options (plus ``extra``)."""
    return {"model": str(args.model), "color": embedder.color, "precision": embedder.precision,
            "fusion": args.fusion, "batch_size": args.batch_size, "workers": args.workers,
            "normalization": "(x/255 - 0.5) / 0.5", **extra}  # fmt: skip


def settings_line(settings: dict) -> str:
    """One line naming the switches of :func:`run_settings`."""
    return (
        f"model {settings['model']}: {settings['color'].upper()} input, flip fusion {settings['fusion']}, "
        f"{settings['precision']}, batch {settings['batch_size']}, {settings['workers']} workers"
    )
