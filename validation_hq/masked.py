"""Masked-face verification on ``.bin`` pairs with the histogram-crossing threshold (docs/methods.md §5.7).

    python -m validation_hq.masked --model M --bin lfw.bin --mask none one both [--json J] [--plot hist.png]

Each pair is compared as the masked-face FYP compares it: Euclidean distance between unit features
(flip-fused as the 10-fold protocol fuses them, unless ``--fusion none``); the threshold is where the
100-bin histograms of same-person and different-person distances cross, by the FYP's rule or, with
``--crossing least``, at the bin where they differ least (:func:`crossing_threshold`); a pair is
called "same" when its distance is at most the threshold. The report gives that accuracy with its
confusion matrix (TP, FP, TN, FN), beside the 10-fold accuracy of ``evaluation.verification``
on the same features. The crossing threshold is fitted on the pairs it scores (the FYP fitted it on a
separate evaluation split), so its accuracy is an in-sample figure; the 10-fold one is not.

``--mask``: ``none`` (the pairs as they are), ``one`` (a synthetic mask from ``data.masks`` on the second
face of each pair: a masked probe against an unmasked reference) or ``both``; several modes run in one
go. Image i's mask is drawn from ``(seed, i)``, so ``one`` and ``both`` put the same mask on a probe.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.fileio import atomic_write, write_json
from data import masks
from data.decode import DecodeError
from data.verification import VerificationFileError, load_bin
from evaluation.extract import extract
from evaluation.options import (
    add_batch_arguments,
    add_embedder_arguments,
    add_fusion_argument,
    embedder_from_args,
    run_settings,
)
from evaluation.verification import evaluate_pairs, fuse_flip

MASK_MODES = ("none", "one", "both")
BINS = 100
CROSSING_RULES = ("first", "least")


# ---------------------------------------------------------------------------------------------- the test


def crossing_threshold(
    same: np.ndarray, diff: np.ndarray, bins: int = BINS, rule: str = "first"
) -> dict[str, Any]:
    """The distance where the same-pair and different-pair histograms cross.

    Both histograms share ``bins`` equal bins over ``[floor(min), ceil(max)]`` of all distances. The search
    runs from the fullest bin of the same pairs up to (not including) the fullest bin of the different
    pairs, or over the whole range when the same pairs' mode is not below the different pairs' one (a model
    that cannot tell them apart).

    ``rule="first"`` (the masked-face FYP's ``evalulate``): the first bin k of the search where the different
    pairs are at least as many as the same pairs (two empty bins count); the threshold is the centre of the
    bin before it, ``low + (k - 1/2) * width``. Where that code fails (no such bin before the different
    pairs' mode: it raises; k = 0: it wraps to the last edge) the search here continues to the end of the
    range (an error if the counts never cross), and k = 0 gives half a bin below the lower edge (every pair
    "different").
    ``rule="least"``: the bin of the search where the two counts differ least (the first on ties); the
    threshold is its centre, about one bin above the first rule's.
    """
    if rule not in CROSSING_RULES:
        raise ValueError(f"crossing rule must be one of {', '.join(CROSSING_RULES)}, got {rule!r}")
    same, diff = np.asarray(same, dtype=np.float64), np.asarray(diff, dtype=np.float64)
    if same.size == 0 or diff.size == 0:
        raise ValueError(f"need same and different pairs, got {same.size} same and {diff.size} different")
    every = np.concatenate([same, diff])
    if not np.all(np.isfinite(every)):
        raise ValueError("distances must be finite")
    low, high = math.floor(every.min()), math.ceil(every.max())
    if high <= low:
        high = low + 1
    edges = np.linspace(low, high, bins + 1)
    same_hist = np.histogram(same, edges)[0]
    diff_hist = np.histogram(diff, edges)[0]
    start, stop = int(np.argmax(same_hist)), int(np.argmax(diff_hist))
    separated = start < stop
    if not separated:
        start, stop = 0, bins
    if rule == "least":
        k = start + int(np.argmin(np.abs(same_hist[start:stop] - diff_hist[start:stop])))
        threshold = (edges[k] + edges[k + 1]) / 2
    else:
        crossed = np.flatnonzero(diff_hist[start:] >= same_hist[start:])
        if crossed.size == 0:  # the same pairs outnumber the different ones to the end of the range
            raise ValueError("the same-pair histogram never falls to the different-pair one")
        k = start + int(crossed[0])
        threshold = low + (k - 0.5) * (high - low) / bins
    return {
        "threshold": float(threshold),
        "bin": k,
        "rule": rule,
        "edges": edges,
        "same_hist": same_hist,
        "diff_hist": diff_hist,
        "separated": bool(separated),
    }


def confusion(dist: np.ndarray, issame: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy and confusion matrix of "same" = ``dist <= threshold`` (positive = same person)."""
    issame = np.asarray(issame, dtype=bool)
    predict = np.asarray(dist) <= threshold
    tp, fp = int((predict & issame).sum()), int((predict & ~issame).sum())
    tn, fn = int((~predict & ~issame).sum()), int((~predict & issame).sum())
    return {
        "accuracy": (tp + tn) / len(issame),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "tpr": tp / max(tp + fn, 1),
        "fpr": fp / max(fp + tn, 1),
    }


def pair_test(features: np.ndarray, issame: np.ndarray, rule: str = "first") -> dict[str, Any]:
    """The histogram-crossing test (``rule``: see :func:`crossing_threshold`) and the 10-fold protocol on
    unit ``features`` (2N, D)."""
    issame = np.asarray(issame, dtype=bool)
    dist = np.linalg.norm(features[0::2] - features[1::2], axis=1)
    crossing = crossing_threshold(dist[issame], dist[~issame], rule=rule)
    ten_fold = evaluate_pairs(features, issame)
    same, diff = dist[issame], dist[~issame]
    spread = math.sqrt((same.var() + diff.var()) / 2)
    return {
        "pairs": len(issame),
        "threshold": crossing["threshold"],
        "rule": rule,
        "histograms_separated": crossing["separated"],
        **confusion(dist, issame, crossing["threshold"]),
        "ten_fold_accuracy": ten_fold["accuracy"],
        "ten_fold_std": ten_fold["accuracy_std"],
        "same_distance_mean": float(same.mean()),
        "diff_distance_mean": float(diff.mean()),
        "d_prime": float((diff.mean() - same.mean()) / spread) if spread > 0 else math.inf,
        "distances": dist,
    }


# ---------------------------------------------------------------------------------------------- masking


def spread_pairs(images: np.ndarray, issame: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` pairs evenly spaced over the set (a .bin is ordered by fold and by same/different, so its
    first pairs are often all of one kind)."""
    if not 10 <= count <= len(issame):
        raise ValueError(f"--pairs {count}: need 10 (for the 10 folds) to {len(issame)} (the set's pairs)")
    picks = np.linspace(0, len(issame) - 1, count).round().astype(int)
    rows = np.stack([2 * picks, 2 * picks + 1], axis=1).ravel()
    return images[rows], issame[picks], f"{count} of {len(issame)}, evenly spaced"


def masked_copies(
    images: np.ndarray, seed: int = 0, types: Sequence[str] = masks.SYNTHETIC_TYPES,
    overlays: Mapping[str, np.ndarray] | None = None, which: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """``images`` (N, 3, H, W) uint8 RGB, with image i masked by ``(seed, i)`` where ``which[i]``."""
    out = images.copy()
    for i in range(len(images)) if which is None else np.flatnonzero(which):
        face = np.ascontiguousarray(images[i].transpose(1, 2, 0))
        masked = masks.add_mask(face, np.random.default_rng([seed, i]), types, overlays=overlays)
        out[i] = masked.transpose(2, 0, 1)
    return out


def evaluate_masked(
    embed, images: np.ndarray, issame: np.ndarray, modes: Sequence[str] = MASK_MODES, seed: int = 0,
    types: Sequence[str] = masks.SYNTHETIC_TYPES, overlays: Mapping[str, np.ndarray] | None = None,
    fusion: str = "sum", batch_size: int = 128, rule: str = "first",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """:func:`pair_test` of each mask mode. Unmasked and masked faces are embedded once each and shared
    by the modes (``one`` = unmasked references with masked probes)."""
    for mode in modes:
        if mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")
    if rule not in CROSSING_RULES:
        raise ValueError(f"crossing rule must be one of {', '.join(CROSSING_RULES)}, got {rule!r}")
    flip = fusion != "none"
    need_plain = any(m in ("none", "one") for m in modes)
    need_masked = {m for m in modes if m != "none"}
    plain = fuse_flip(*extract(embed, images, batch_size, flip=flip), fusion) if need_plain else None
    masked = None
    if need_masked:
        which = np.ones(len(images), bool)
        if need_masked == {"one"}:
            which[0::2] = False  # only the probes are needed
        covered = masked_copies(images, seed, types, overlays, which)
        masked = fuse_flip(*extract(embed, covered, batch_size, flip=flip), fusion)
    results = {}
    for mode in modes:
        if mode == "none":
            features = plain
        elif mode == "both":
            features = masked
        else:
            features = plain.copy()
            features[1::2] = masked[1::2]
        results[mode] = pair_test(features, issame, rule)
    return results


# ---------------------------------------------------------------------------------------------- reports


def format_table(name: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    head = (
        f"{'mask':<5} {'pairs':>6} {'threshold':>9} {'accuracy':>9} {'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5}"
    )
    rows = [f"{name}: {head} {'10-fold':>17}"]
    pad = " " * (len(name) + 2)
    for mode, r in results.items():
        ten_fold = f"{r['ten_fold_accuracy'] * 100:.2f} ± {r['ten_fold_std'] * 100:.2f}"
        rows.append(f"{pad}{mode:<5} {r['pairs']:>6} {r['threshold']:>9.3f} {r['accuracy'] * 100:>8.2f}% "
                    f"{r['tp']:>5} {r['fp']:>5} {r['tn']:>5} {r['fn']:>5} {ten_fold:>17}")  # fmt: skip
    return "\n".join(rows)


def plot_histograms(
    results: Mapping[str, Mapping[str, Any]], issame: np.ndarray, path: Path, title: str
) -> None:
    """Same/different distance histograms of each mode, with the crossing threshold, as one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    issame = np.asarray(issame, dtype=bool)
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
    for ax, (mode, r) in zip(axes[0], results.items(), strict=True):
        dist = r["distances"]
        crossing = crossing_threshold(dist[issame], dist[~issame], rule=r["rule"])
        edges = crossing["edges"]
        ax.stairs(crossing["same_hist"], edges, fill=True, alpha=0.5, label="same")
        ax.stairs(crossing["diff_hist"], edges, fill=True, alpha=0.5, label="different")
        ax.axvline(
            r["threshold"], color="k", linestyle="--", linewidth=1, label=f"threshold {r['threshold']:.2f}"
        )
        ax.set_title(f"mask: {mode}, accuracy {r['accuracy'] * 100:.1f}%")
        ax.set_xlabel("Euclidean distance of unit features")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pairs")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m validation_hq.masked",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_embedder_arguments(parser)
    parser.add_argument("--bin", "--bins", type=Path, required=True, help="verification .bin")
    parser.add_argument("--mask", nargs="+", choices=MASK_MODES, default=["none"], help="faces to mask")
    parser.add_argument(
        "--types", nargs="+", choices=masks.MASK_TYPES, help="mask types (default: synthetic ones)"
    )
    parser.add_argument("--overlays", type=Path, help="folder of mask_<colour>.jpg pictures (type overlay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--pairs", type=int, help="only N pairs, evenly spaced over the set")
    add_fusion_argument(parser)
    parser.add_argument(
        "--crossing", choices=CROSSING_RULES, default="first",
        help="threshold rule: first (the FYP's: centre of the bin before the first where different pairs "
        "are at least as many) or least (centre of the bin where the counts differ least)",
    )  # fmt: skip
    add_batch_arguments(parser, 128)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the distance histograms here (.png, .pdf)")
    args = parser.parse_args(argv)
    try:
        overlays = masks.load_overlays(args.overlays) if args.overlays else None
        types = args.types or (masks.SYNTHETIC_TYPES + (("overlay",) if overlays else ()))
        if "overlay" in types and not overlays:
            raise ValueError(
                "--types overlay needs --overlays DIR (the folder of mask_<colour>.jpg pictures)"
            )
        val = load_bin(args.bin)
        images, issame = val.images, val.issame
        pairs_used = "all"
        if args.pairs is not None:
            images, issame, pairs_used = spread_pairs(images, issame, args.pairs)
        embed = embedder_from_args(args)
        results = evaluate_masked(embed, images, issame, args.mask, args.seed, types, overlays, args.fusion,
                                  args.batch_size, args.crossing)  # fmt: skip
    except (FileNotFoundError, ValueError, VerificationFileError, DecodeError) as err:
        print(f"masked: {err}", file=sys.stderr)
        return 2
    print(f"model {args.model}: {embed.color.upper()} input, flip fusion {args.fusion}, masks "
          f"{', '.join(types)} (seed {args.seed}); 'same': distance <= the crossing threshold "
          f"({args.crossing} rule)")  # fmt: skip
    print(format_table(val.name, results))
    if args.plot:
        plot_histograms(results, issame, args.plot, f"{val.name}: {args.model.name}")
    if args.json:
        report = {
            "set": val.name,
            "bin": str(args.bin),
            "results": {m: {k: v for k, v in r.items() if k != "distances"} for m, r in results.items()},
            "settings": run_settings(args, embed, types=list(types), seed=args.seed, bins=BINS,
                                     crossing=args.crossing, pairs_used=pairs_used,
                                     distance="euclidean, unit features"),
        }  # fmt: skip
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
