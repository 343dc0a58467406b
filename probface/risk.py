"""Risk-controlled verification (docs/methods.md §5.6): how accuracy rises when the most uncertain pairs
are refused.

    python -m probface.risk --model work_dirs/probface/last.pt --bin lfw.bin [cfp_fp.bin ...] [--json J]
    python -m probface.risk --model CKPT --bin lfw.bin --pairs 1200              # a quicker look

Every image gets (mu, sigma^2) from a ProbFace checkpoint, from the image alone as in ProbFace's evaluation
(``--flip``: an image and its mirror image are fused as a two-image template, ``probface.fusion``). A pair's
uncertainty is u = max(sigma1^2, sigma2^2) (``--pair-uncertainty sum``: their sum; a per-dimension sigma^2
counts by its mean). For each risk factor r (default 0, 0.1, 0.2, 0.3) the pairs with u above the
(1 - r) * 100th percentile of u are dropped and the 10-fold accuracy of the cosine and of the mutual
likelihood score (MLS) is recomputed on the kept pairs, in 10 contiguous folds. The threshold of each fold
(``--thresholds``):

* ``probface`` (default, ProbFace's evaluation): the candidates are the scores of the genuine pairs of the 9
  training folds, a pair is "same" when its score is >= the threshold, and the threshold is the mean of the
  candidates that reach the best training accuracy;
* ``bin``: cosine by ``evaluation.verification.evaluate_pairs`` (the .bin protocol: squared distance of the
  unit mu, thresholds 0:0.01:4, the first best), MLS by the accuracy-maximising midpoint between
  consecutive training scores (the first on ties).

The sigma^2 percentiles of the set's images are printed too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import CheckpointError
from core.fileio import write_json
from data.verification import VerificationFileError, load_bin
from evaluation.options import add_batch_arguments, run_settings
from evaluation.verification import accuracy_curve, contiguous_folds, evaluate_pairs
from probface.embedder import extract_uncertain, load_probface
from probface.fusion import cosine_scores, mls_scores, scalar_sigma2

RISKS = (0.0, 0.1, 0.2, 0.3)
PERCENTILES = (0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 100)
THRESHOLD_RULES = ("probface", "bin")


def pair_uncertainty(sigma2: np.ndarray, how: str = "max") -> np.ndarray:
    """u of pair k (images 2k and 2k + 1) from per-image sigma2 (2N, 1 or D)."""
    s = scalar_sigma2(sigma2)
    if how == "max":
        return np.maximum(s[0::2], s[1::2])
    if how == "sum":
        return s[0::2] + s[1::2]
    raise ValueError(f"pair uncertainty must be 'max' or 'sum', got {how!r}")


def probface_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """ProbFace's threshold on training scores (higher = same): among the genuine pairs' scores, the mean of
    those at which ``score >= threshold`` is the most accurate (+inf, all "different", without genuine
    pairs)."""
    candidates = np.sort(scores[issame])
    if candidates.size == 0:
        return float("inf")
    accepted_genuine = issame.sum() - np.searchsorted(candidates, candidates, side="left")
    rejected_impostors = np.searchsorted(np.sort(scores[~issame]), candidates, side="left")
    correct = accepted_genuine + rejected_impostors
    return float(np.mean(candidates[correct == correct.max()]))


def similarity_accuracy(
    scores: np.ndarray, issame: np.ndarray, nfolds: int = 10, rule: str = "probface"
) -> tuple[float, float]:
    """10-fold accuracy (mean, std) of a similarity (higher = same), each fold's threshold chosen on the
    other folds: ``probface`` by :func:`probface_threshold`, ``midpoint`` the accuracy-maximising midpoint
    between their sorted distinct scores (the first on ties, "same" when above)."""
    issame = np.asarray(issame, dtype=bool)
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    if rule not in ("probface", "midpoint"):
        raise ValueError(f"similarity threshold rule must be 'probface' or 'midpoint', got {rule!r}")
    scores = np.asarray(scores, dtype=np.float64)
    accuracies = []
    for test in contiguous_folds(len(issame), nfolds):
        train = np.setdiff1d(np.arange(len(issame)), test)
        if rule == "probface":
            best = probface_threshold(scores[train], issame[train])
            accuracies.append(float(np.mean((scores[test] >= best) == issame[test])))
            continue
        dist = -scores  # "same" when below the threshold, as in the .bin protocol
        values = np.unique(dist[train])
        candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
        best = candidates[int(np.argmax(accuracy_curve(dist[train], issame[train], candidates)))]
        accuracies.append(float(np.mean((dist[test] < best) == issame[test])))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def sigma2_percentiles(sigma2: np.ndarray) -> dict[str, float]:
    s = scalar_sigma2(sigma2)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(s, PERCENTILES), strict=True)}


def risk_controlled(
    mu: np.ndarray,
    sigma2: np.ndarray,
    issame: np.ndarray,
    risks: Sequence[float] = RISKS,
    how: str = "max",
    thresholds: str = "probface",
) -> list[dict[str, Any]]:
    """One row per risk factor: the u threshold, kept pairs, cosine and MLS 10-fold accuracy (and std), the
    folds' thresholds chosen by ``thresholds`` (``probface`` or ``bin``, see the module's text)."""
    issame = np.asarray(issame, dtype=bool)
    if len(mu) != 2 * len(issame) or len(sigma2) != len(mu):
        raise ValueError(f"{len(mu)} embeddings and {len(sigma2)} variances for {len(issame)} pairs")
    if thresholds not in THRESHOLD_RULES:
        raise ValueError(f"thresholds must be one of {', '.join(THRESHOLD_RULES)}, got {thresholds!r}")
    u = pair_uncertainty(sigma2, how)
    cosine_all = cosine_scores(mu[0::2], mu[1::2])
    mls = mls_scores(mu[0::2], sigma2[0::2], mu[1::2], sigma2[1::2])
    rows = []
    for r in risks:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"risk factors must be in [0, 1), got {r}")
        threshold = float(np.percentile(u, 100.0 * (1.0 - r)))
        keep = u <= threshold
        if thresholds == "bin":
            protocol = evaluate_pairs(mu[np.repeat(keep, 2)], issame[keep])
            cosine = protocol["accuracy"], protocol["accuracy_std"]
            mls_acc, mls_std = similarity_accuracy(mls[keep], issame[keep], rule="midpoint")
        else:
            cosine = similarity_accuracy(cosine_all[keep], issame[keep])
            mls_acc, mls_std = similarity_accuracy(mls[keep], issame[keep])
        rows.append({
            "risk": float(r), "u_threshold": threshold, "pairs": int(keep.sum()),
            "cosine_accuracy": cosine[0], "cosine_std": cosine[1],
            "mls_accuracy": mls_acc, "mls_std": mls_std,
        })  # fmt: skip
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'risk':>5} {'pairs':>6} {'u <=':>10} {'cosine acc':>16} {'MLS acc':>16}"]
    for r in rows:
        cosine = f"{r['cosine_accuracy'] * 100:.2f} ± {r['cosine_std'] * 100:.2f}"
        mls = f"{r['mls_accuracy'] * 100:.2f} ± {r['mls_std'] * 100:.2f}"
        lines.append(f"{r['risk']:>5.2f} {r['pairs']:>6} {r['u_threshold']:>10.4g} {cosine:>16} {mls:>16}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="ProbFace checkpoint (train.py)")
    parser.add_argument(
        "--bin", "--bins", nargs="+", type=Path, required=True, help="verification .bin files"
    )
    parser.add_argument("--risks", nargs="+", type=float, default=list(RISKS), help="risk factors r")
    parser.add_argument("--pair-uncertainty", choices=["max", "sum"], default="max")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="fuse each image with its mirror image (ProbFace's evaluation: --no-flip, the default)",
    )
    parser.add_argument(
        "--thresholds", choices=THRESHOLD_RULES, default="probface", help="how a fold's threshold is chosen"
    )
    parser.add_argument("--pairs", type=int, default=0, help="use the first N pairs of each set (0: all)")
    add_batch_arguments(parser, 128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results: dict[str, Any] = {}
    try:
        embedder = load_probface(args.model, args.device)
        for path in args.bin:
            val = load_bin(path)
            pairs = args.pairs or len(val.issame)
            images, issame = val.images[: 2 * pairs], val.issame[:pairs]
            mu, sigma2 = extract_uncertain(embedder, images, args.batch_size, args.flip)
            percentiles = sigma2_percentiles(sigma2)
            rows = risk_controlled(mu, sigma2, issame, args.risks, args.pair_uncertainty, args.thresholds)
            results[val.name] = {"sigma2_percentiles": percentiles, "rows": rows}
            print(f"{val.name}: {len(issame)} pairs, u = {args.pair_uncertainty}(sigma1^2, sigma2^2), "
                  f"{'flip fused' if args.flip else 'no flip'}, {args.thresholds} thresholds")  # fmt: skip
            print("sigma^2 percentiles: " + " ".join(f"{k} {v:.4g}" for k, v in percentiles.items()))
            print(format_rows(rows))
    except (FileNotFoundError, CheckpointError, VerificationFileError, ValueError) as err:
        print(f"probface.risk: {err}", file=sys.stderr)
        return 2
    results["settings"] = run_settings(
        args, embedder, pair_uncertainty=args.pair_uncertainty, flip=args.flip, thresholds=args.thresholds,
        risks=args.risks, pairs=args.pairs or "all",
    )  # fmt: skip
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
