r"""Error-versus-discard characteristic (EDC) of face image qualities on a verification pair set
(``evaluation.quality``; docs/evaluation.md, "Quality: error-versus-discard").

    python -m validation_hq.quality --model CKPT_OR_ONNX --bin lfw.bin --quality norm --plot edc.png
    python -m validation_hq.quality --model M.onnx --color bgr --bin lfw.bin --photos lfw_photos \
        --pairs pairs.txt --quality norm detector --json edc.json --plot edc.png
    python -m validation_hq.quality --model M --photos lfw_photos --pairs pairs.txt --quality detector

The pairs come from a ``.bin`` (pair k = images 2k and 2k + 1) or, without ``--bin``, from the raw photos
and an LFW-style pairs file: each photo's largest YuNet face aligned to the ArcFace template (as
``scripts/prepare_dataset.py`` makes a ``.bin``). ``--photos``/``--pairs`` beside a ``.bin`` name its images
by the photos it was made from (checked: same number of pairs, same labels), which the detector score
needs. A pair's comparison score is the cosine of the flip-fused unit features (``--fusion``, as the
10-fold protocol); qualities: ``norm`` (feature norm of the image's un-normalised embedding), ``sigma2``
(ProbFace, ``--probface CKPT``), ``detector`` (YuNet's face score on the raw photo), and files of scores
per image (``--scores NAME=FILE``: lines ``image score``, the image as its index in the set, or with
``--photos`` as its photo's name, file name or path).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from data.verification import VerificationFileError, VerificationSet, find_image, load_bin, read_pairs
from evaluation.cache import FeatureCache
from evaluation.embedders import embedder_key
from evaluation.extract import extract
from evaluation.options import (
    add_batch_arguments,
    add_cache_argument,
    add_embedder_arguments,
    add_fusion_argument,
    embedder_from_args,
    run_settings,
)
from evaluation.quality import (
    DESCRIPTIONS,
    DISCARD_RULE,
    ImageKeys,
    QualityError,
    add_quality_arguments,
    check_fmrs,
    detect_photos,
    evaluate_edc,
    feature_norm,
    format_report,
    pair_quality,
    photo_keys,
    quality_requests,
    read_scores,
    sigma2_quality,
    write_outputs,
)
from evaluation.verification import fuse_flip

PROG = "quality"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validation_hq.quality", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_embedder_arguments(parser)
    parser.add_argument("--bin", "--bins", type=Path, help="verification .bin (pairs of aligned faces)")
    parser.add_argument("--photos", type=Path, help="the raw photos of the pairs (LFW: <Name>_<NNNN>.jpg)")
    parser.add_argument("--pairs", type=Path, help="LFW-style pairs file naming the photos of each pair")
    parser.add_argument(
        "--detector", type=Path, help="YuNet ONNX model (default: found as face_alignment does)"
    )
    add_fusion_argument(parser)
    add_batch_arguments(parser, 128, 4, "threads decoding the .bin")
    add_cache_argument(parser, help="folder for features (.npz), reused by later runs")
    add_quality_arguments(parser, "YuNet's face score on the raw photo (needs --photos and --pairs)")
    return parser


def pair_photos(pairs_file: Path, photos: Path) -> tuple[list[Path], np.ndarray]:
    """The photo of every image of the pairs (pair k: images 2k, 2k + 1) and the pairs' labels."""
    pairs = read_pairs(pairs_file)
    paths = []
    for pair in pairs:
        for name, number in ((pair.name1, pair.num1), (pair.name2, pair.num2)):
            path = find_image(photos, name, number)
            if path is None:
                file = f"{name}_{number:04d}.jpg"
                raise QualityError(f"{pairs_file}:{pair.line}: no photo {name}/{file} or {file} in {photos}")
            paths.append(path)
    return paths, np.array([p.same for p in pairs])


def load_pairs(args: argparse.Namespace) -> tuple[VerificationSet | None, list[Path] | None, np.ndarray]:
    """(the .bin or None, the photos of its images or None, the labels), checked against each other."""
    if (args.photos is None) != (args.pairs is None):
        raise QualityError("--photos and --pairs go together (the raw photos and the pairs file naming them)")
    if args.bin is None and args.photos is None:
        raise QualityError("no pairs: give --bin, or --photos and --pairs")
    photos, issame = pair_photos(args.pairs, args.photos) if args.photos else (None, None)
    val = load_bin(args.bin, workers=args.workers) if args.bin else None
    if val is not None and issame is not None:
        if len(issame) != len(val.issame):
            raise QualityError(f"{args.pairs}: {len(issame)} pairs, but {args.bin} holds {len(val.issame)}")
        differ = np.flatnonzero(issame != val.issame)
        if len(differ):
            k = int(differ[0])
            label = "same" if issame[k] else "different"
            raise QualityError(
                f"{args.pairs}: pair {k} is {label} there, not in {args.bin}: not the pairs it was made from"
            )
    return val, photos, val.issame if val is not None else issame


def image_keys(val: VerificationSet | None, photos: list[Path] | None, args: argparse.Namespace) -> ImageKeys:
    source = args.bin.name if args.bin else str(args.pairs)
    count = 2 * len(val.issame) if val is not None else len(photos or [])
    what = f"the {count} images of {source}"
    return photo_keys(photos, args.photos, what) if photos is not None else ImageKeys(count, what)


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The results and the arrays of ``--dump``; every input is checked before the model runs."""
    builtin, files = quality_requests(args)
    if "detector" in builtin and args.photos is None:
        raise QualityError("--quality detector needs the raw photos: --photos DIR --pairs pairs.txt")
    val, photos, issame = load_pairs(args)
    name = val.name if val is not None else args.pairs.stem
    notes = check_fmrs(int((~issame).sum()), args, name)
    keys = image_keys(val, photos, args)
    qualities = {q: read_scores(path, keys) for q, path in files.items()}
    for note in notes:
        print(f"{PROG}: {name}: {note}", file=sys.stderr)

    detected, crops = (
        detect_photos(photos, args.detector, crops=val is None) if photos is not None and
        ("detector" in builtin or val is None) else ({}, {})
    )  # fmt: skip
    if val is None:
        images = np.stack([crops[p].transpose(2, 0, 1) for p in photos])
        val = VerificationSet(name=name, path=args.pairs, images=images, issame=issame)
    embed = embedder_from_args(args)
    flip = args.fusion != "none"
    original, flipped = FeatureCache(args.cache, PROG).features(
        f"{val.name}__{embedder_key(args.model, embed)}",
        lambda: extract(embed, val.images, args.batch_size, flip=flip), len(val.images), flip,
    )  # fmt: skip
    features = fuse_flip(original, flipped, args.fusion)
    scores = np.sum(features[0::2] * features[1::2], axis=1)
    image_q: dict[str, np.ndarray] = {}
    for q in builtin:
        if q == "norm":
            image_q[q] = feature_norm(original)
        elif q == "detector":
            image_q[q] = np.array([detected[p] for p in photos])
        else:
            from probface.embedder import extract_uncertain, load_probface

            _, sigma2 = extract_uncertain(
                load_probface(args.probface, args.device), val.images, args.batch_size, False
            )
            image_q[q] = sigma2_quality(sigma2)
    image_q |= qualities
    pair_q = {q: pair_quality(v[0::2], v[1::2]) for q, v in image_q.items()}
    results = {
        "set": val.name, "pairs": len(issame), "genuine": int(issame.sum()),
        "impostors": int((~issame).sum()),
        "qualities": {q: DESCRIPTIONS.get(q, f"scores file {files.get(q)}") for q in image_q},
        "edc": evaluate_edc(scores, issame, pair_q, args.fmr, args.discard_limit, args.min_false_matches),
        "settings": run_settings(
            args, embed, fmrs=args.fmr, discard_limit=args.discard_limit,
            min_false_matches=args.min_false_matches, score="cosine of the flip-fused unit features",
            pair_quality="min of the two images'", discard=DISCARD_RULE,
            photos=str(args.photos) if args.photos else None,
            pairs_file=str(args.pairs) if args.pairs else None,
            no_face=int(sum(1 for s in detected.values() if s == 0.0)) if detected else None,
        ),
    }  # fmt: skip
    dump = {"scores": scores, "genuine": issame, **{f"image_{q}": v for q, v in image_q.items()},
            **{f"pair_{q}": v for q, v in pair_q.items()}}  # fmt: skip
    return results, dump


@main_guard(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for out in (args.json, args.plot, args.dump):
            if out is not None:
                check_writable(out)  # before any work, not after
        results, dump = evaluate(args)
        title = f"{results['set']}: EDC of {args.model.name}\npair quality = min of the two images' qualities"
        color = results["settings"]["color"].upper()
        counts = f"{results['pairs']} pairs ({results['genuine']} genuine, {results['impostors']} impostor)"
        print(f"{results['set']}: {counts}; {args.model.name}, {color} input, fusion {args.fusion}")
        print(format_report(results["edc"], args.discard_limit))
        written = write_outputs(args, results, title, lambda: dump)
    except (OSError, ValueError, VerificationFileError) as err:
        print(f"{PROG}: {error_line(err)}", file=sys.stderr)
        return 2
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
