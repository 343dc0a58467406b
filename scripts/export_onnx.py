"""Export a backbone to ONNX for insightface-style deployments and check it against PyTorch.

    python -m scripts.export_onnx CKPT out.onnx [--fold-normalization] [--backbone r50 --color rgb]

Only the backbone is exported: input ``data`` (N x 3 x 112 x 112 float, dynamic batch), one output
``embedding`` (N x D, un-normalised). Input convention:

* default: ``(x / 255 - 0.5) / 0.5`` of the pixels, channels in the model's colour order (the ``color``
  entry of the ONNX metadata);
* ``--fold-normalization``: raw RGB pixels 0..255 as float; the colour swap (for BGR-trained models) and
  the normalisation are part of the graph, whose first nodes are the Sub and Mul that insightface's model
  zoo looks for to feed such models unnormalised input.

The export is run by onnxruntime on real aligned faces (the CelebA crops of the data folder, or
``--verify-images DIR``) and must match PyTorch within 1e-4 on unit-normalised features; only then is
``out.onnx`` written, atomically (a file already there stays as it was when the export or the check fails).
``CKPT`` is a checkpoint of this framework or a plain state dict (with ``--backbone``); of a checkpoint
trained with ``train.ema``, ``--use-ema`` exports the average of the weights instead of the trained
ones (``raw``, the default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from core.checkpoint import NORMALIZATION
from core.cli import check_writable, error_line, main_guard
from core.fileio import atomic_write
from core.paths import shared_data_dir
from evaluation.embedders import OnnxEmbedder, TorchEmbedder, load_embedder
from inference import read_aligned


class FoldedInput(nn.Module):
    """RGB pixels 0..255 -> the model's colour order and ``(x - 127.5) / 127.5`` -> the backbone."""

    def __init__(self, model: nn.Module, color: str) -> None:
        super().__init__()
        self.model, self.bgr = model, color == "bgr"

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        x = (data - 127.5) * (1.0 / 127.5)  # first, so that Sub and Mul open the graph
        return self.model(x.flip(1) if self.bgr else x)


def normalization_first(graph: onnx.GraphProto) -> None:
    """Put the input's Sub and Mul (and the constants they read) at the head of the graph, named Sub*/Mul*:
    insightface routes a model whose first 8 nodes hold both to unnormalised input. They read only the
    input and constants, so the order stays topological."""
    nodes = list(graph.node)
    sub = next(n for n in nodes if n.op_type == "Sub" and "data" in n.input)
    mul = next(n for n in nodes if n.op_type == "Mul" and sub.output[0] in n.input)
    wanted = set(sub.input) | set(mul.input)
    front = [n for n in nodes if n.op_type == "Constant" and set(n.output) & wanted] + [sub, mul]
    for node in (sub, mul):
        if not node.name.startswith(node.op_type):
            node.name = f"{node.op_type}{node.name.replace('/', '_')}"
    rest = [n for n in nodes if all(n is not f for f in front)]
    del graph.node[:]
    graph.node.extend(front + rest)


def export(embedder: TorchEmbedder, out: Path, fold: bool, opset: int = 17) -> None:
    model = FoldedInput(embedder.model, embedder.color) if fold else embedder.model
    model.eval()
    side = getattr(embedder.model, "input_size", 112)
    dummy = torch.zeros(2, 3, side, side)
    with warnings.catch_warnings():  # the TorchScript exporter: no onnxscript needed, plain Conv/BN graphs
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(out), input_names=["data"], output_names=["embedding"],
            dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    graph = onnx.load(str(out))
    if fold:
        normalization_first(graph.graph)
    meta = {
        "color": "rgb" if fold else embedder.color,
        "normalization": "none: RGB pixels 0..255 (folded into the graph)" if fold else NORMALIZATION,
        "framework": "facerec",
    }
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(out))


def real_faces(folder: Path | None, count: int = 16) -> torch.Tensor:
    """uint8 RGB aligned crops for the check: from ``folder``, else the CelebA crops of the data folder."""
    folder = folder or shared_data_dir() / "celeba_aligned112"
    paths = sorted(folder.rglob("*.jpg"))[:count]
    if not paths:
        raise FileNotFoundError(f"no aligned .jpg faces under {folder} to check the export on")
    return read_aligned(paths)


def verify(embedder: TorchEmbedder, out: Path, fold: bool, images: torch.Tensor) -> float:
    """Largest difference of unit features between PyTorch and onnxruntime on ``images``."""
    reference = torch.nn.functional.normalize(embedder(images), dim=1)
    if fold:
        session = OnnxEmbedder(out).session
        raw = session.run(None, {"data": images.float().numpy()})[0]
        exported = torch.from_numpy(np.asarray(raw))
    else:
        exported = OnnxEmbedder(out)(images)
    return float((torch.nn.functional.normalize(exported, dim=1) - reference).abs().max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fold-normalization", action="store_true", help="input RGB 0..255, as insightface")
    parser.add_argument("--backbone", help="architecture of a plain state dict")
    parser.add_argument("--color", choices=["rgb", "bgr"], help="colour order of a plain state dict")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--verify-images", type=Path, help="folder of aligned 112x112 faces for the check")
    parser.add_argument(
        "--use-ema",
        action="store_true",
        help="export a checkpoint's weight average kept with train.ema (default: its trained weights)",
    )
    return parser


@main_guard("export_onnx")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable(args.out)  # before the export and its check, not after
    try:
        embedder = load_embedder(
            args.checkpoint,
            backbone=args.backbone,
            color=args.color,
            weights="ema" if args.use_ema else "raw",
        )
        if not isinstance(embedder, TorchEmbedder):
            raise ValueError(f"{args.checkpoint}: already an exported model")
        faces = real_faces(args.verify_images)
        # exported and checked in a scratch folder; OUT is written (atomically) only once it has passed
        with tempfile.TemporaryDirectory(prefix="export_onnx_") as scratch:
            staged = Path(scratch) / "model.onnx"
            export(embedder, staged, args.fold_normalization, args.opset)
            difference = verify(embedder, staged, args.fold_normalization, faces)
            if difference > 1e-4:
                print(f"export_onnx: the export differs from PyTorch by {difference:.2e} (> 1e-4) on unit "
                      f"features; {args.out} not written", file=sys.stderr)  # fmt: skip
                return 1
            with atomic_write(args.out, "wb") as fh:
                fh.write(staged.read_bytes())
    except (OSError, ValueError) as err:
        print(f"export_onnx: {error_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: input data (N x 3 x 112 x 112), output embedding; max |PyTorch - onnxruntime| "
          f"of unit features on 16 real faces: {difference:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
