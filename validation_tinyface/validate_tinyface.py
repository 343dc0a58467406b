"""Evaluate a model on TinyFace closed-set identification (docs/methods.md §5.4): rank-1 / rank-5 / rank-20.

    python validation_tinyface/validate_tinyface.py --data_root /data/tinyface --model CKPT_OR_ONNX
    python -m validation_tinyface.validate_tinyface --data_root . --model model.pt --backbone r100 \\
        --color bgr --workers 8 --precision bf16 --json out.json --cache work_dirs/features

``--data_root`` holds AdaFace's aligned copy (``aligned_pad_0.1_pad_high/{Probe,Gallery_Match,
Gallery_Distractor}``) or is that folder itself. Images are read as they are (pre-aligned; another size
than 112x112 is scaled to it), embedded with their horizontal flips, fused (default: sum before
normalisation, AdaFace's ``pre_norm_vector_add``) and L2-normalised; a probe's score against the gallery is
the inner product. Prints the table with the switches that produced it; ``--json`` writes it.
Identities come from TinyFace's file names (``<id>_<n>.jpg``); a folder of one's own named otherwise
needs ``--identities FILE`` (``<image> <identity>`` per line, the image as ``Probe/x.jpg`` or ``x.jpg``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file, python validation_tinyface/validate_tinyface.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from collections.abc import Sequence
from typing import Any

from core.cli import check_writable, error_line, main_guard
from core.embedders import (
    add_embedder_arguments,
    embedder_from_args,
    embedder_key,
    run_settings,
    settings_line,
)
from core.extract import extract_files
from core.fileio import atomic_write
from data.decode import decode_rgb
from validation_hq.protocol import FUSIONS, fuse_flip
from validation_tinyface.protocol import (
    RANKS,
    TinyFaceSet,
    find_testing_set,
    identification,
    read_tinyface,
)

# AdaFace's names for the flip fusions, accepted so its command lines keep working.
ADAFACE_FUSIONS = {
    "pre_norm_vector_add": "sum",
    "norm_weighted_avg": "norm_weighted",
    "average": "unit_mean",
}


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
    path = cache / f"tinyface__{key}.npz" if cache is not None else None
    flip = fusion != "none"
    original, flipped = extract_files(
        embed, tinyface.files, batch_size, flip, workers, cache=path,
        progress="tinyface" if sys.stderr.isatty() else None,
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_root", "--data-root", type=Path, required=True,
                        help="folder with aligned_pad_0.1_pad_high/ (or the three folders)")  # fmt: skip
    add_embedder_arguments(parser)
    parser.add_argument("--fusion", "--fusion_method", default="sum",
                        choices=[*FUSIONS, *ADAFACE_FUSIONS], help="flip fusion (none: no flip)")  # fmt: skip
    parser.add_argument("--batch-size", "--batch_size", type=int, default=256)
    parser.add_argument("--workers", "--num_workers", type=int, default=4, help="image loader processes")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cache", type=Path, help="folder for features (.npz), reused by later runs")
    parser.add_argument("--identities", type=Path, metavar="FILE",
                        help="identity list ('<image> <identity>' per line) for folders whose file names "
                             "are not TinyFace's <id>_<n>.jpg")  # fmt: skip
    args = parser.parse_args(argv)
    args.fusion = ADAFACE_FUSIONS.get(args.fusion, args.fusion)
    return args


@main_guard("validate_tinyface")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
        with atomic_write(args.json, "w", encoding="utf-8") as fh:
            json.dump({"tinyface": result, "settings": settings}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
