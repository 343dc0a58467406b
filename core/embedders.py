"""Embedders from files: a checkpoint of ours, an insightface ``model.pt`` state dict, or an ONNX model.

An embedder maps a uint8 RGB batch (N, 3, 112, 112) to float32 features (N, D); each knows the colour order
its network expects and converts on the way in, so callers always hand over RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones import build_backbone
from core.checkpoint import load_checkpoint
from data.transforms import normalize_batch


class TorchEmbedder:
    """A backbone, put in eval mode; ``color`` is the order its network was trained on; ``channels_last``
    feeds the input in that memory format (for a model converted to it)."""

    def __init__(
        self,
        model: nn.Module,
        color: str = "rgb",
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.model, self.color, self.device = model.eval().to(device), color, torch.device(device)
        self.channels_last = channels_last

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        x = normalize_batch(x, self.color, getattr(self.model, "input_size", None))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()


class OnnxEmbedder:
    """An ONNX model run by onnxruntime on ``(x - 127.5) / 127.5`` input in ``color`` order (the
    insightface convention; the colour comes from the model's ``color`` metadata when it has one)."""

    def __init__(self, path: str | os.PathLike[str], color: str | None = None) -> None:
        import onnxruntime

        self.path = Path(path)
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
) -> TorchEmbedder | OnnxEmbedder:
    """An embedder for ``path``: ``.onnx`` files run with onnxruntime; a checkpoint of this framework
    carries its architecture and colour; any other state dict (insightface ``model.pt``) needs
    ``backbone`` (and ``color``, default rgb)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.suffix == ".onnx":
        return OnnxEmbedder(path, color)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format_version" in state:
        state = load_checkpoint(path)
        meta = state["meta"]
        model = build_backbone(
            meta["arch"], embedding_size=meta["embedding_size"], input_size=meta["input_size"]
        )
        model.load_state_dict(state["backbone"])
        return TorchEmbedder(model, color or meta["color"], device)
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
    return TorchEmbedder(model, color or "rgb", device)
