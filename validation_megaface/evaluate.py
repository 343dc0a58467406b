"""Evaluate a model on MegaFace challenge 1 (docs/methods.md §5.5): rank-1 identification and TAR@FAR
1e-1 ... 1e-9.

    python -m validation_megaface.evaluate --data-root /data/megaface_testpack --model CKPT_OR_ONNX
    python -m validation_megaface.evaluate --data-root /data/megaface_testpack --model model.pt \\
        --backbone r100 --workers 16 --precision bf16 --cache /scratch/megaface_features --json out.json

``--data-root`` holds ``facescrub_images/``, ``megaface_images/``, ``facescrub_noises.txt`` and
``megaface_noises.txt`` (insightface's testpack). Images are scaled to 112x112 if they are not, embedded
with their horizontal flips, fused (default: sum, then L2-normalised) and scored by inner product.

Distractor features are written to ``--cache`` as ``.npy`` blocks of ``--block-size`` images (each
block once: an interrupted run resumes where it stopped, and a re-run with the same model, files and
fusion only scores) and read back memory-mapped; scoring keeps only per-probe maxima and two histograms,
so the memory needed does not grow with the number of distractors.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from core.fileio import write_json
from core.paths import PROJECT_ROOT
from evaluation.cache import FeatureCache
from evaluation.embedders import embedder_key
from evaluation.extract import extract_files
from evaluation.options import (
    add_batch_arguments,
    add_cache_argument,
    add_data_root_argument,
    add_embedder_arguments,
    add_fusion_argument,
    embedder_from_args,
    run_settings,
    settings_line,
)
from evaluation.verification import fuse_flip
from validation_megaface.protocol import (
    FARS,
    HEADLINE_FAR,
    NUM_BINS,
    list_facescrub,
    list_megaface,
    rank1_identification,
    read_facescrub_noises,
    read_megaface_noises,
    score_megaface,
    tar_at_fars,
)

BLOCK_SIZE = 100_000


def _digest(files: Sequence[Path], fusion: str, key: str) -> str:
    """A short name for a model ``key``, a fusion and a list of files, so stored features never mix."""
    h = hashlib.sha1(f"{key}\0{fusion}".encode())
    for f in files:
        h.update(b"\0" + str(f).encode())
    return h.hexdigest()[:12]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fused_features(
    embed,
    files: Sequence[Path],
    store: FeatureCache,
    stem: str,
    fusion: str = "sum",
    batch_size: int = 256,
    workers: int = 0,
) -> np.ndarray:
    """Unit features of ``files`` (flip-fused), entry ``stem`` (float32 ``.npy``) of ``store`` read back
    memory-mapped; an entry with one row per file is reused."""

    def compute() -> np.ndarray:
        original, flipped = extract_files(embed, files, batch_size, fusion != "none", workers)
        return fuse_flip(original, flipped, fusion)

    return store.fused(stem, compute, rows=len(files))


def distractor_blocks(
    embed,
    files: Sequence[Path],
    folder: Path,
    fusion: str = "sum",
    batch_size: int = 256,
    workers: int = 0,
    block_size: int = BLOCK_SIZE,
    key: str = "",
) -> list[np.ndarray]:
    """Memory-mapped feature blocks of the distractors, ``folder/distractors_<digest>_<k>.npy`` (the digest
    names the model ``key``, the fusion and the file list), extracting only the blocks not stored yet."""
    store = FeatureCache(folder, "megaface")
    digest = _digest(files, fusion, key)
    blocks = []
    for k, start in enumerate(range(0, len(files), block_size)):
        part = files[start : start + block_size]
        started = time.perf_counter()
        stem = f"distractors_{digest}_{k:05d}"
        stored = store.path(stem, ".npy").is_file()
        blocks.append(fused_features(embed, part, store, stem, fusion, batch_size, workers))
        if not stored:
            rate = len(part) / (time.perf_counter() - started)
            _log(f"megaface: distractors {start + len(part)}/{len(files)} embedded ({rate:.0f} images/s)")
    return blocks


@dataclass
class MegaFaceFeatures:
    """Unit features of the kept probes (with their identities) and of the kept distractors (memory-mapped
    blocks), and the noise-list reports."""

    probes: np.ndarray
    ids: np.ndarray
    identities: list[str]
    distractors: list[np.ndarray]
    noises: dict[str, Any]


def megaface_features(
    embed,
    root: Path,
    features: Path,
    fusion: str = "sum",
    batch_size: int = 256,
    workers: int = 0,
    block_size: int = BLOCK_SIZE,
    keep_noises: bool = False,
    strict_noises: bool = False,
    limit_distractors: int | None = None,
    key: str = "",
) -> MegaFaceFeatures:
    """List the testpack at ``root`` (noise lists applied unless ``keep_noises``) and embed it, storing
    the features under ``features`` by model ``key`` (see :func:`distractor_blocks`)."""
    root = Path(root)
    face_noises = None if keep_noises else read_facescrub_noises(root / "facescrub_noises.txt")
    mega_noises = None if keep_noises else read_megaface_noises(root / "megaface_noises.txt")
    probes = list_facescrub(root / "facescrub_images", face_noises, strict_noises)
    distractor_files, mega_report = list_megaface(
        root / "megaface_images", mega_noises, strict_noises, limit_distractors
    )
    probe_stem = f"probes_{_digest(probes.files, fusion, key)}"
    store = FeatureCache(features, "megaface")
    probe_features = fused_features(embed, probes.files, store, probe_stem, fusion, batch_size, workers)
    blocks = distractor_blocks(
        embed, distractor_files, features, fusion, batch_size, workers, block_size, key
    )
    noises = {"facescrub": probes.noises, "megaface": mega_report}
    return MegaFaceFeatures(probe_features, probes.ids, probes.identities, blocks, noises)


def megaface_results(
    feats: MegaFaceFeatures, chunk: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Rank-1 identification and TAR at :data:`FARS` from the features (one scoring pass)."""
    started = time.perf_counter()
    scores = score_megaface(feats.probes, feats.ids, feats.distractors, chunk=chunk, device=device)
    accuracy, successes, pairs = rank1_identification(feats.probes, feats.ids, scores.max_distractor)
    tars = tar_at_fars(scores.genuine, scores.impostor, FARS)
    return {
        "rank-1": accuracy,
        f"tar@far={HEADLINE_FAR:.0e}": tars[HEADLINE_FAR],
        "tar_at_far": {f"{far:.0e}": tar for far, tar in tars.items()},
        "identification_pairs": pairs,
        "identification_successes": successes,
        "probes": len(feats.probes),
        "identities": len(feats.identities),
        "distractors": sum(len(b) for b in feats.distractors),
        "genuine_scores": int(scores.genuine.sum()),
        "impostor_scores": int(scores.impostor.sum()),
        "noises": feats.noises,
        "scoring_seconds": time.perf_counter() - started,
    }


def evaluate_megaface(
    embed, root: Path, features: Path, chunk: int | None = None, device: str = "cpu", **options: Any
) -> dict[str, Any]:
    """:func:`megaface_results` of :func:`megaface_features` (whose keyword ``options`` it passes on): the
    protocol's numbers for an embedder of uint8 RGB batches on the testpack at ``root``."""
    return megaface_results(megaface_features(embed, root, features, **options), chunk, device)


def format_table(result: dict[str, Any]) -> str:
    noise = result["noises"]
    lines = [
        f"MegaFace: {result['probes']} probes of {result['identities']} identities "
        f"({noise['facescrub']['removed']} noisy removed), {result['distractors']} distractors "
        f"({noise['megaface']['removed']} noisy removed)",
        f"{'rank-1':>8} " + " ".join(f"{'TAR@' + far:>10}" for far in result["tar_at_far"]),
        f"{result['rank-1'] * 100:>8.2f} "
        + " ".join(f"{tar * 100:>10.2f}" for tar in result["tar_at_far"].values()),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_root_argument(parser, "--root", help="the testpack folder (facescrub_images/, ...)")
    add_embedder_arguments(parser)
    add_fusion_argument(parser)
    add_batch_arguments(parser, 256, 4, "image loader processes")
    add_cache_argument(parser, "--features", help="feature store (default work_dirs/megaface/<model>)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="distractors per .npy block")
    parser.add_argument("--chunk", type=int, help="distractors scored per step (default: 16M scores a step)")
    parser.add_argument("--keep-noises", action="store_true", help="do not remove the noise lists' images")
    parser.add_argument("--strict-noises", action="store_true",
                        help="a noise entry that names no image under --data-root is an error")  # fmt: skip
    parser.add_argument("--limit-distractors", type=int, help="use the first N distractors (quick runs)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


@main_guard("megaface")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:
        check_writable(args.json)  # before the features are extracted, not after
    try:
        embed = embedder_from_args(args)
        key = embedder_key(args.model, embed)
        features = args.cache or PROJECT_ROOT / "work_dirs" / "megaface" / key
        result = evaluate_megaface(
            embed, args.data_root, features, args.chunk, args.device, fusion=args.fusion,
            batch_size=args.batch_size, workers=args.workers, block_size=args.block_size,
            keep_noises=args.keep_noises, strict_noises=args.strict_noises,
            limit_distractors=args.limit_distractors, key=key,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"megaface: {error_line(err)}", file=sys.stderr)
        return 2
    settings = run_settings(args, embed, features=str(features), histogram_bins=NUM_BINS,
                            score="inner product of L2-normalised features")  # fmt: skip
    print(settings_line(settings))
    print(format_table(result))
    if args.json:
        write_json(args.json, {"megaface": result, "settings": settings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
