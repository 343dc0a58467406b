"""ProbFace template fusion on IJB-B / IJB-C: per-image weights for ``validation_ijb.evaluate --weights``.

    python -m probface.ijb --model work_dirs/probface/last.pt --data-root IJB_release --dataset ijbc \\
        --out work_dirs/eval/ijbc_probface_weights.npy [--temperature 1]
    python -m validation_ijb.evaluate --model work_dirs/probface/last.pt --data-root IJB_release \\
        --dataset ijbc --modes N0D0F1 N1D0F1 --weights work_dirs/eval/ijbc_probface_weights.npy

Every face of ``face_tid_mid`` is aligned as the evaluator aligns it and gets its sigma^2 (the image and its
mirror image fused, ``probface.embedder``); its weight is (1 / sigma^2)^(1/T) (a per-dimension sigma^2
counts by its mean). The evaluator multiplies each image feature by its weight before media pooling; with
unit features (N0) and one image per media that is exactly ProbFace's fused mu_T = normalise(sum_k w_k mu_k)
(``probface.fusion``); frames of one video are still averaged within their media first. ``--sigma2`` also
saves the variances.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.checkpoint import CheckpointError
from core.fileio import atomic_write
from evaluation.options import add_batch_arguments, add_data_root_argument
from probface.embedder import ProbFaceEmbedder, extract_uncertain_dataset, load_probface
from probface.fusion import image_weights, scalar_sigma2
from validation_ijb.dataset import AlignedFaces
from validation_ijb.meta import DATASETS, IJBMeta, load_ijb


def ijb_sigma2(
    embedder: ProbFaceEmbedder, meta: IJBMeta, batch_size: int = 128, workers: int = 4
) -> np.ndarray:
    """sigma2 (N, S) of every face of ``meta`` in the rows of ``face_tid_mid``."""
    faces = AlignedFaces(meta.image_paths, meta.landmarks)
    return extract_uncertain_dataset(embedder, faces, batch_size, True, workers, f"{meta.dataset} sigma^2")[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="ProbFace checkpoint (train.py)")
    add_data_root_argument(parser, "--ijb-root", "--image-path",
                           help="IJB_release folder (with IJBB/, IJBC/), or its IJBB/ or IJBC/")  # fmt: skip
    parser.add_argument("--dataset", "--dataset_name", type=str.lower, choices=list(DATASETS), default="ijbc",
                        help="ijbc or ijbb (AdaFace's IJBC, IJBB too)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="weights .npy to write")
    parser.add_argument("--temperature", type=float, default=1.0, help="T of (1/sigma^2)^(1/T)")
    parser.add_argument("--sigma2", type=Path, help="also write the per-image sigma^2 (.npy) here")
    add_batch_arguments(parser, 128, 4, "loader processes decoding and aligning")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = load_ijb(args.data_root, args.dataset, ("1:1",))
        sigma2 = ijb_sigma2(load_probface(args.model, args.device), meta, args.batch_size, args.workers)
        weights = image_weights(sigma2, args.temperature)
    except (OSError, CheckpointError, ValueError) as err:
        print(f"probface.ijb: {err}", file=sys.stderr)
        return 2
    with atomic_write(args.out, "wb") as fh:
        np.save(fh, weights)
    if args.sigma2:
        with atomic_write(args.sigma2, "wb") as fh:
            np.save(fh, sigma2)
    s = scalar_sigma2(sigma2)
    print(f"{DATASETS[args.dataset][0]}: {len(s)} images, sigma^2 median {np.median(s):.4g} "
          f"(5-95%: {np.percentile(s, 5):.4g}-{np.percentile(s, 95):.4g}); weights (T {args.temperature}) "
          f"-> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
