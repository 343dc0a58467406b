"""Faces sorted by ProbFace uncertainty: a grid of the most certain and the most uncertain faces of a set.

    python -m probface.plot --model work_dirs/probface/last.pt --bin lfw.bin --out probface_lfw.png
    python -m probface.plot --model CKPT --folder aligned_faces/ --count 10 --out faces.png

The top rows show the ``count`` faces with the lowest sigma^2, the bottom rows the ``count`` with the highest,
each labelled with its sigma^2 (flip-fused, as ``probface.risk`` computes it). ``--limit`` takes the first N
images of the set; an image that occurs again (a .bin repeats faces across pairs) is shown once. A folder
is read recursively and must hold aligned square crops of one size.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.checkpoint import CheckpointError
from core.fileio import atomic_write
from data.decode import decode_rgb
from data.image_folder import IMAGE_SUFFIXES
from data.verification import VerificationFileError, load_bin
from inference import read_aligned
from probface.embedder import extract_uncertain, load_probface
from probface.fusion import scalar_sigma2


def read_folder(root: Path) -> np.ndarray:
    """Every image under ``root`` (sorted paths) as uint8 N x 3 x s x s; s is the first image's side."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    side = decode_rgb(paths[0].read_bytes(), source=str(paths[0])).shape[0]
    return read_aligned(paths, side).numpy()


def distinct(images: np.ndarray) -> np.ndarray:
    """The images in their order, each exact copy after the first left out."""
    first: dict[bytes, int] = {}
    for i, image in enumerate(images):
        first.setdefault(hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest(), i)
    return images[sorted(first.values())]


def plot_uncertainty_grid(
    images: np.ndarray, sigma2: np.ndarray, path: Path, count: int = 8, title: str = "", cell: float = 0.95
) -> Path:
    """Write a PNG: a row of the ``count`` lowest-, then one of the ``count`` highest-sigma^2 faces of
    ``images`` (uint8 N x 3 x H x W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scalar_sigma2(sigma2)
    if len(s) != len(images):
        raise ValueError(f"{len(images)} images but {len(s)} variances")
    count = min(count, len(s) // 2)
    order = np.argsort(s, kind="stable")
    groups = [("lowest σ²", order[:count]), ("highest σ²", order[::-1][:count])]
    fig, axes = plt.subplots(2, count, figsize=(cell * count, cell * 2 + 0.6), squeeze=False)
    for row, (label, picks) in enumerate(groups):
        for col, i in enumerate(picks):
            ax = axes[row][col]
            ax.imshow(images[i].transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{s[i]:.3g}", fontsize=7, labelpad=1)
        axes[row][0].set_ylabel(label, fontsize=7)
    fig.suptitle(title or "faces sorted by ProbFace σ²", fontsize=8)
    fig.tight_layout(pad=0.3)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="ProbFace checkpoint (train.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bin", type=Path, help="verification .bin")
    source.add_argument("--folder", type=Path, help="folder of aligned face crops")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--count", type=int, default=8, help="faces per row")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images only (0: all)")
    parser.add_argument("--no-flip", dest="flip", action="store_false")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        embedder = load_probface(args.model)
        images = load_bin(args.bin).images if args.bin else read_folder(args.folder)
        if args.limit:
            images = images[: args.limit]
        images = distinct(images)
        _, sigma2 = extract_uncertain(embedder, images, args.batch_size, args.flip)
        name = (args.bin or args.folder).name
        plot_uncertainty_grid(images, sigma2, args.out, args.count, f"{name}: faces sorted by ProbFace σ²")
    except (FileNotFoundError, CheckpointError, VerificationFileError, ValueError) as err:
        print(f"probface.plot: {err}", file=sys.stderr)
        return 2
    s = scalar_sigma2(sigma2)
    spread = f"sigma^2 {s.min():.4g} to {s.max():.4g} (median {np.median(s):.4g})"
    print(f"{len(s)} distinct faces, {spread}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
