"""Print the cosine-similarity matrix of aligned face crops under a backbone.

    python inference.py --backbone r50 --weights model.pt --images a.jpg b.jpg c.jpg [--color rgb]

Images must already be aligned 112x112 crops (the insightface template). ``--weights`` takes a state dict
in the insightface arcface_torch layout (its released ``model.pt`` files) or a dict holding one under
``state_dict``/``backbone``. Detection and alignment of raw photos live in ``face_alignment/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones import build_backbone
from data.decode import decode_rgb
from data.transforms import normalize_batch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="aligned 112x112 face crops")
    parser.add_argument("--backbone", default="r50", help="registered backbone name (see list_backbones)")
    parser.add_argument("--weights", type=Path, required=True, help="backbone state dict (.pt)")
    parser.add_argument("--color", choices=["rgb", "bgr"], default="rgb", help="colour order of the model")
    parser.add_argument("--embedding-size", type=int, default=512)
    return parser.parse_args(argv)


def load_backbone(name: str, weights: Path, embedding_size: int) -> nn.Module:
    """Build ``name`` and load a state dict from ``weights`` (plain, or under ``state_dict``/``backbone``)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("backbone", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state dict, got {type(state).__name__}")
    model = build_backbone(name, embedding_size=embedding_size)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: does not fit backbone {name!r}: {err}") from None
    return model.eval()


def read_aligned(paths: Sequence[Path], size: int = 112) -> torch.Tensor:
    """uint8 RGB N x 3 x size x size; a crop of another size is an error naming the file."""
    images = []
    for path in paths:
        img = decode_rgb(path.read_bytes(), source=str(path))
        if img.shape[:2] != (size, size):
            raise ValueError(
                f"{path}: {img.shape[1]}x{img.shape[0]} image; expected an aligned {size}x{size} face crop"
            )
        images.append(img.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images))


@torch.no_grad()
def similarity_matrix(model: nn.Module, images: torch.Tensor, color: str) -> torch.Tensor:
    emb = model(normalize_batch(images, color=color))
    emb = torch.nn.functional.normalize(emb, dim=1)
    return emb @ emb.T


def format_matrix(names: Sequence[str], sim: torch.Tensor) -> str:
    width = max(8, *(len(n) for n in names))
    rows = [" " * width + "".join(f"{n[:width]:>{width + 1}}" for n in names)]
    for name, row in zip(names, sim.tolist(), strict=True):
        rows.append(f"{name:<{width}}" + "".join(f"{v:>{width + 1}.3f}" for v in row))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_backbone(args.backbone, args.weights, args.embedding_size)
    sim = similarity_matrix(model, read_aligned(args.images), args.color)
    print(format_matrix([p.name for p in args.images], sim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
