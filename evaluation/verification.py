"""Verification metrics: flip fusion, the 10-fold protocol of pair lists, ROC and TAR@FAR.

**10-fold protocol** (docs/methods.md §5.2), as insightface and AdaFace run it on the ``.bin`` sets:

1. Embed every image and its horizontal flip; fuse them (default: sum the un-normalised embeddings, then
   L2-normalise).
2. d = |e1 - e2|^2 per pair; thresholds 0:0.01:4; the pairs split into 10 contiguous folds (no shuffle).
   For each fold the accuracy-maximising threshold on the other 9 folds (the first, on ties) is applied to
   the held-out fold. Accuracy is the mean (and std) over folds.
3. VAL@FAR: per fold, the threshold where the training folds' FAR reaches the target (linear
   interpolation between neighbouring points of 0:0.001:4; 0 when the target is never reached), then VAL
   and FAR on the held-out fold.

**ROC and TAR@FAR** of similarity scores (higher = more alike; IJB 1:1, docs/methods.md §5.3):
:func:`roc_curve` as scikit-learn's ``roc_curve`` computes it, and :func:`tar_at_far` the way insightface's
IJB script reads it (the ROC point whose FPR is closest to the target; the larger TPR wins ties).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FUSIONS = ("sum", "norm_weighted", "unit_mean", "concat", "none")
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


# ------------------------------------------------------------------------------------------ flip fusion


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fuse_flip(original: np.ndarray, flipped: np.ndarray | None, mode: str = "sum") -> np.ndarray:
    """Unit features from the embeddings of the images and of their flips.

    ``sum``: normalise(e + e_flip) (insightface; equals AdaFace's norm-weighted "pre_norm_vector_add");
    ``norm_weighted``: the same sum written as sum |e| e/|e|; ``unit_mean``: normalise(e/|e| + e_f/|e_f|);
    ``concat``: normalise([e, e_flip]); ``none``: normalise(e) (no flip).
    """
    if mode not in FUSIONS:
        raise ValueError(f"flip fusion must be one of {', '.join(FUSIONS)}, got {mode!r}")
    if mode == "none" or flipped is None:
        if mode != "none":
            raise ValueError(f"flip fusion {mode!r} needs the flipped embeddings")
        return l2_normalize(original)
    if mode in ("sum", "norm_weighted"):
        return l2_normalize(original + flipped)
    if mode == "unit_mean":
        return l2_normalize(l2_normalize(original) + l2_normalize(flipped))
    return l2_normalize(np.concatenate([original, flipped], axis=1))


# ------------------------------------------------------------------------------------- 10-fold protocol


def contiguous_folds(n: int, nfolds: int) -> list[np.ndarray]:
    """Contiguous folds as sklearn's KFold(shuffle=False) makes them (the first n % k folds one longer)."""
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(nfolds)]


def count_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``values`` are < each threshold (predicted "same" at that threshold)."""
    return np.searchsorted(np.sort(values), thresholds, side="left")


def accuracy_curve(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same" = ``dist < threshold`` at each of ``thresholds``."""
    true_accepts = count_below(dist[same], thresholds)
    true_rejects = (~same).sum() - count_below(dist[~same], thresholds)
    return (true_accepts + true_rejects) / len(dist)


def _accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> float:
    return float(np.mean((dist < threshold) == same))


def _val_far(threshold: float, dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    predict = dist < threshold
    n_same, n_diff = same.sum(), (~same).sum()
    val = (predict & same).sum() / n_same if n_same else 0.0
    far = (predict & ~same).sum() / n_diff if n_diff else 0.0
    return float(val), float(far)


def _far_threshold(far: np.ndarray, target: float) -> float:
    """Threshold on the 0:0.001:4 grid where the FAR curve reaches ``target``: linear interpolation between
    the last grid point at or below the target and the next one (0 when the target is never reached)."""
    if far.max() < target:
        return 0.0
    i = int(np.searchsorted(far, target, side="right")) - 1  # far is non-decreasing in the threshold
    if i < 0:
        return float(VAL_THRESHOLDS[0])
    if i + 1 >= len(far) or far[i + 1] == far[i]:
        return float(VAL_THRESHOLDS[i])
    fraction = (target - far[i]) / (far[i + 1] - far[i])
    return float(VAL_THRESHOLDS[i] + fraction * (VAL_THRESHOLDS[i + 1] - VAL_THRESHOLDS[i]))


def evaluate_pairs(
    features: np.ndarray, issame: np.ndarray, nfolds: int = 10, far_target: float = 1e-3
) -> dict[str, Any]:
    """10-fold accuracy and VAL@FAR of unit ``features`` (2N, D): pair k = rows 2k and 2k+1."""
    issame = np.asarray(issame, dtype=bool)
    if features.shape[0] != 2 * len(issame):
        raise ValueError(f"{features.shape[0]} features for {len(issame)} pairs; need 2 per pair")
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    dist = np.sum((features[0::2] - features[1::2]) ** 2, axis=1)
    accuracies, thresholds, vals, fars = [], [], [], []
    for test in contiguous_folds(len(issame), nfolds):
        train = np.setdiff1d(np.arange(len(issame)), test)
        train_acc = accuracy_curve(dist[train], issame[train], ACC_THRESHOLDS)
        best = ACC_THRESHOLDS[int(np.argmax(train_acc))]
        thresholds.append(float(best))
        accuracies.append(_accuracy(best, dist[test], issame[test]))
        train_diff = dist[train][~issame[train]]
        train_far = count_below(train_diff, VAL_THRESHOLDS) / max(1, len(train_diff))
        threshold = _far_threshold(train_far, far_target)
        val, far = _val_far(threshold, dist[test], issame[test])
        vals.append(val)
        fars.append(far)
    return {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
        "val": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "far": float(np.mean(fars)),
        "pairs": len(issame),
    }


def verification_results(
    original: np.ndarray, flipped: np.ndarray | None, issame: np.ndarray, fusion: str = "sum"
) -> dict[str, Any]:
    """The reported numbers of one pair set from the features of its images (and of their flips): pairs,
    10-fold accuracy and its std, VAL at FAR 1e-3 and the FAR reached, the mean feature norm. The
    ``.bin`` evaluator and training-time validation report these."""
    metrics = evaluate_pairs(fuse_flip(original, flipped, fusion), issame)
    return {
        "pairs": len(issame),
        "accuracy": metrics["accuracy"],
        "accuracy_std": metrics["accuracy_std"],
        "val_at_far_1e-3": metrics["val"],
        "far": metrics["far"],
        "feature_norm": float(np.linalg.norm(original, axis=1).mean()),
    }


# ---------------------------------------------------------------------------------------- ROC, TAR@FAR


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with thresholds decreasing, as ``sklearn.metrics.roc_curve`` returns them:
    one point per distinct score, a first point (0, 0) at threshold +inf, and (with
    ``drop_intermediate``) collinear points removed."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    if not labels.any() or labels.all():
        raise ValueError("the ROC needs both genuine (label 1) and impostor (label 0) pairs")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tps = np.cumsum(labels)[last].astype(np.float64)
    fps = (last + 1) - tps
    thresholds = scores[last]
    if drop_intermediate and len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Iterable[float] = FARS) -> dict[float, float]:
    """TAR at each target FAR: the TPR of the ROC point whose FPR is nearest the target (the arrays are
    searched from the high-FPR end, so among equally near points the larger TPR wins)."""
    fpr_r, tpr_r = np.asarray(fpr)[::-1], np.asarray(tpr)[::-1]
    return {float(far): float(tpr_r[int(np.argmin(np.abs(fpr_r - far)))]) for far in fars}
