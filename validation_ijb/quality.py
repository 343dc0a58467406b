r"""Error-versus-discard characteristic (EDC) of face image qualities on the IJB-B / IJB-C 1:1 template pairs
(``evaluation.quality``; docs/evaluation.md, "Quality: error-versus-discard").

    python -m validation_ijb.quality --model CKPT_OR_ONNX --data-root /data/IJB_release --dataset ijbc \
        --quality norm detector --json edc.json --plot edc.png --cache work_dirs/eval/cache

``--model`` may also be a features file of the IJB evaluator (``--cache``), re-scored without the model.
A template pair's comparison score is the cosine of its template features under one N/D/F mode of the IJB
evaluator (``--mode``, default N1D1F1, docs/methods.md §5.3). Image qualities: ``norm`` (feature norm of the
image's un-normalised embedding, no flip), ``detector`` (the faceness score of ``*_name_5pts_score.txt``),
``sigma2`` (ProbFace, ``--probface CKPT``) or files of scores per image (``--scores NAME=FILE``, the image as
its name in ``face_tid_mid`` (``1.jpg``), its path under the dataset folder (``loose_crop/1.jpg``) or its
row index). A template's quality is the mean of its images' qualities (every row of ``face_tid_mid``
counts, frames of one video included); a pair's quality is the lower of its two templates'.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from evaluation.cache import FeatureCache, read_features
from evaluation.embedders import embedder_key
from evaluation.extract import extract_dataset
from evaluation.options import (
    add_batch_arguments,
    add_cache_argument,
    add_data_root_argument,
    add_embedder_arguments,
    embedder_from_args,
    run_settings,
)
from evaluation.quality import (
    DESCRIPTIONS,
    DISCARD_RULE,
    ImageKeys,
    add_quality_arguments,
    check_fmrs,
    evaluate_edc,
    feature_norm,
    format_report,
    pair_quality,
    quality_requests,
    read_scores,
    sigma2_quality,
    write_outputs,
)
from validation_ijb.dataset import AlignedFaces
from validation_ijb.meta import DATASETS, IJBMeta, load_ijb
from validation_ijb.protocol import Mode, image_features, pair_scores, template_features, template_rows

PROG = "quality"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m validation_ijb.quality", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_embedder_arguments(parser)
    add_data_root_argument(parser, "--ijb-root", help="IJB_release folder (with IJBB/, IJBC/)")
    parser.add_argument("--dataset", "--dataset_name", type=str.lower, choices=list(DATASETS), default="ijbc",
                        help="ijbc or ijbb (AdaFace's IJBC, IJBB too)")  # fmt: skip
    parser.add_argument("--mode", default="N1D1F1", help="N/D/F switches of the comparison score (N1D1F1)")
    add_batch_arguments(parser, 128, 4, "loader processes decoding and aligning")
    add_cache_argument(parser, help="folder for the per-image features (.npz), reused later")
    add_quality_arguments(parser, "the faceness score of the meta file")
    return parser


def template_quality(image_quality: np.ndarray, templates: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Quality of each template of ``ids`` (sorted): the mean of the qualities of its images (rows)."""
    image_quality, templates = np.asarray(image_quality, np.float64), np.asarray(templates)
    rows = template_rows(ids, templates, "image list")
    sums = np.bincount(rows, weights=image_quality, minlength=len(ids))
    return sums / np.bincount(rows, minlength=len(ids))


def image_keys(meta: IJBMeta) -> ImageKeys:
    keys = ImageKeys(len(meta.names), f"the {len(meta.names)} images of {meta.dataset} in {meta.folder}")
    for i, name in enumerate(meta.names):
        keys.add(i, str(name), f"loose_crop/{name}")
    return keys


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    builtin, files = quality_requests(args)
    mode = Mode.parse(args.mode)
    meta = load_ijb(args.data_root, args.dataset, ("1:1",))
    t1, t2, labels = meta.pairs
    genuine = np.asarray(labels) == 1
    notes = check_fmrs(int((~genuine).sum()), args, meta.dataset)
    keys = image_keys(meta)
    qualities = {q: read_scores(path, keys) for q, path in files.items()}
    for note in notes:
        print(f"{PROG}: {meta.dataset}: {note}", file=sys.stderr)

    faces = AlignedFaces(meta.image_paths, meta.landmarks)
    recorded = {"names": meta.names, "landmarks": meta.landmarks}
    source = f"{meta.dataset} in {meta.folder}"
    embed = None
    if args.model.suffix == ".npz":  # features saved by the IJB evaluator (--cache): no model needed
        original, flipped = read_features(args.model, len(meta.names), True, recorded, source)
    else:
        embed = embedder_from_args(args)
        bar = f"{meta.dataset} images"
        original, flipped = FeatureCache(args.cache, PROG).features(
            f"{meta.dataset}__{embedder_key(args.model, embed)}",
            lambda: extract_dataset(embed, faces, args.batch_size, True, args.workers, bar),
            len(meta.names), True, recorded=recorded, source=source,
        )  # fmt: skip
    feats = image_features(original, flipped, meta.faceness, mode)
    ids, template_feats = template_features(feats, meta.templates, meta.medias)
    scores = pair_scores(ids, template_feats, t1, t2)
    image_q: dict[str, np.ndarray] = {}
    for q in builtin:
        if q == "norm":
            image_q[q] = feature_norm(original)
        elif q == "detector":
            image_q[q] = np.asarray(meta.faceness, np.float64)
        else:
            from probface.embedder import extract_uncertain_dataset, load_probface

            probface = load_probface(args.probface, args.device)
            _, sigma2 = extract_uncertain_dataset(probface, faces, args.batch_size, False, args.workers)
            image_q[q] = sigma2_quality(sigma2)
    image_q |= qualities
    rows1, rows2 = template_rows(ids, t1, "1:1 pairs"), template_rows(ids, t2, "1:1 pairs")
    template_q = {q: template_quality(v, meta.templates, ids) for q, v in image_q.items()}
    pair_q = {q: pair_quality(v[rows1], v[rows2]) for q, v in template_q.items()}
    descriptions = {**DESCRIPTIONS, "detector": "faceness score of the meta file"}
    results = {
        "set": meta.dataset, "pairs": len(scores), "genuine": int(genuine.sum()),
        "impostors": int((~genuine).sum()), "templates": len(ids), "images": len(meta.names),
        "qualities": {q: descriptions.get(q, f"scores file {files.get(q)}") for q in image_q},
        "edc": evaluate_edc(scores, genuine, pair_q, args.fmr, args.discard_limit, args.min_false_matches),
        "settings": run_settings(
            args, embed, mode=mode.name, fmrs=args.fmr, discard_limit=args.discard_limit,
            min_false_matches=args.min_false_matches, template_quality="mean of its images' qualities",
            pair_quality="min of the two templates'", discard=DISCARD_RULE,
        ),
    }  # fmt: skip
    dump = {"scores": scores, "genuine": genuine, "template_ids": ids,
            **{f"image_{q}": v for q, v in image_q.items()},
            **{f"pair_{q}": v for q, v in pair_q.items()}}  # fmt: skip
    return results, dump


@main_guard(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for out in (args.json, args.plot, args.dump):
            if out is not None:
                check_writable(out)
        results, dump = evaluate(args)
        name = DATASETS[results["set"]][0]
        title = f"{name} 1:1: EDC of {args.model.name} ({args.mode})\ntemplate quality = mean of its images'"
        counts = f"{results['pairs']} template pairs ({results['genuine']} genuine)"
        print(f"{name}: {counts} of {results['templates']} templates; {args.model.name}, {args.mode}")
        print(format_report(results["edc"], args.discard_limit))
        written = write_outputs(args, results, title, lambda: dump)
    except (OSError, ValueError) as err:
        print(f"{PROG}: {error_line(err)}", file=sys.stderr)
        return 2
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
