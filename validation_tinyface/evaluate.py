"""Evaluate a model on TinyFace closed-set identification (docs/methods.md §5.4): rank-1 / rank-5 / rank-20.

    python -m validation_tinyface.evaluate --data-root /data/tinyface --model CKPT_OR_ONNX
    python -m validation_tinyface.evaluate --data-root . --model model.pt --backbone r100 \\
        --color bgr --workers 8 --precision bf16 --json out.json --cache work_dirs/features

AdaFace's form, ``python validation_tinyface/validate_tinyface.py --data_root ...``, runs this module too.
``--data-root`` holds AdaFace's aligned copy (``aligned_pad_0.1_pad_high/{Probe,Gallery_Match,
Gallery_Distractor}``) or is that folder itself. Images are read as they are (pre-aligned; another size
than 112x112 is scaled to it), embedded with their horizontal flips, fused (default: sum before
normalisation, AdaFace's ``pre_norm_vector_add``) and L2-normalised; a probe's score against the gallery is
the inner product. Prints the table with the switches that produced it; ``--json`` writes it.
Identities come from TinyFace's file names (``<id>_<n>.jpg``); a folder of one's own named otherwise
needs ``--identities FILE`` (``<image> <identity>`` per line, the image as ``Probe/x.jpg`` or ``x.jpg``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from core.fileio import write_json
from data.decode import decode_rgb
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
from validation_tinyface.protocol import (
    RANKS,
    TinyFaceSet,
    find_testing_set,
    identification,
    read_tinyface,
)


def evaluate_tinyface(
    embed,
    tinyface: TinyFaceSet,
    fusion: str = "sum",
    batch_size: int = 256,
    workers: int = 0,
    cache: Path | None = None,
    key: str = "",
    ranks: Sequence[int] = RANKS,
) -> dict[str, Any]:
    """TinyFace rank-k rates of an embedder of uint8 RGB batches on a test split
    (``read_tinyface(find_testing_set(data_root))``); with ``cache``, the features (and their flips) are
    stored in ``cache/tinyface__<key>.npz`` and reused for the same files (so another fusion needs no
    model run)."""
    flip = fusion != "none"
    progress = "tinyface" if sys.stderr.isatty() else None
    original, flipped = FeatureCache(cache, "validate_tinyface").features(
        f"tinyface__{key}",
        lambda: extract_files(embed, tinyface.files, batch_size, flip, workers, progress=progress),
        rows=len(tinyface.files), flip=flip, recorded={"files": np.array([str(p) for p in tinyface.files])},
        source=f"TinyFace in {tinyface.root}",
    )  # fmt: skip
    result = identification(fuse_flip(original, flipped, fusion), tinyface, ranks)
    result["root"], result["identities_from"] = str(tinyface.root), tinyface.identity_source
    return result


def image_size_note(files: Sequence[Path]) -> str | None:
    """A warning when the first image is not a 112x112 crop (the protocol expects pre-aligned crops)."""
    img = decode_rgb(files[0].read_bytes(), str(files[0]))
    if img.shape[:2] == (112, 112):
        return None
    return (
        f"note: {files[0]} is {img.shape[1]}x{img.shape[0]}; images are scaled to 112x112. TinyFace needs "
        "aligned crops (AdaFace's aligned_pad_0.1_pad_high); the raw Testing_Set scores far lower."
    )


def format_table(result: dict[str, Any], ranks: Sequence[int]) -> str:
    head = " ".join(f"{f'rank-{k}':>8}" for k in ranks)
    row = " ".join(f"{result[f'rank-{k}'] * 100:>8.2f}" for k in ranks)
    counts = (
        f"{result['probes']} probes ({result['identities']} identities), gallery {result['gallery_matches']} "
        f"matches + {result['distractors']} distractors"
    )
    return f"TinyFace: {counts}\n{head}\n{row}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_root_argument(parser, help="folder with aligned_pad_0.1_pad_high/ (or the three folders)")
    add_embedder_arguments(parser)
    add_fusion_argument(parser)
    add_batch_arguments(parser, 256, 4, "image loader processes")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--json", type=Path, help="write the results here")
    add_cache_argument(parser, help="folder for features (.npz), reused by later runs")
    parser.add_argument("--identities", type=Path, metavar="FILE",
                        help="identity list ('<image> <identity>' per line) for folders whose file names "
                             "are not TinyFace's <id>_<n>.jpg")  # fmt: skip
    return parser


@main_guard("validate_tinyface")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:
        check_writable(args.json)  # before the features are extracted, not after
    try:
        embed = embedder_from_args(args)
        tinyface = read_tinyface(find_testing_set(args.data_root), args.identities)
        note = image_size_note(tinyface.probes)
        if note:
            print(note, file=sys.stderr)
        result = evaluate_tinyface(embed, tinyface, args.fusion, args.batch_size, args.workers, args.cache,
                                   embedder_key(args.model, embed), args.ranks)  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"validate_tinyface: {error_line(err)}", file=sys.stderr)
        return 2
    settings = run_settings(args, embed, score="inner product of L2-normalised features")
    print(settings_line(settings))
    print(format_table(result, args.ranks))
    if args.json:
        write_json(args.json, {"tinyface": result, "settings": settings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
