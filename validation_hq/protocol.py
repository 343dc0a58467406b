"""The 10-fold verification protocol of the .bin sets (docs/methods.md §5.2), as insightface and AdaFace
run it.

1. Embed every image and its horizontal flip; fuse them (default: sum the un-normalised embeddings, then
   L2-normalise).
2. d = |e1 - e2|^2 per pair; thresholds 0:0.01:4; the pairs split into 10 contiguous folds (no shuffle).
   For each fold the accuracy-maximising threshold on the other 9 folds (the first, on ties) is applied to
   the held-out fold. Accuracy is the mean (and std) over folds.
3. VAL@FAR: per fold, the threshold where the training folds' FAR reaches the target (linear
   interpolation between neighbouring points of 0:0.001:4; 0 when the target is never reached), then VAL
   and FAR on the held-out fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FUSIONS = ("sum", "norm_weighted", "unit_mean", "concat", "none")


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


def _folds(n: int, nfolds: int) -> list[np.ndarray]:
    """Contiguous folds as sklearn's KFold(shuffle=False) makes them (the first n % k folds one longer)."""
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(nfolds)]


def _accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> float:
    return float(np.mean((dist < threshold) == same))


def _below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many ``values`` are < each threshold (predicted "same" at that threshold)."""
    return np.searchsorted(np.sort(values), thresholds, side="left")


def _accuracy_curve(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    true_accepts = _below(dist[same], thresholds)
    true_rejects = (~same).sum() - _below(dist[~same], thresholds)
    return (true_accepts + true_rejects) / len(dist)


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
    for test in _folds(len(issame), nfolds):
        train = np.setdiff1d(np.arange(len(issame)), test)
        train_acc = _accuracy_curve(dist[train], issame[train], ACC_THRESHOLDS)
        best = ACC_THRESHOLDS[int(np.argmax(train_acc))]
        thresholds.append(float(best))
        accuracies.append(_accuracy(best, dist[test], issame[test]))
        train_diff = dist[train][~issame[train]]
        train_far = _below(train_diff, VAL_THRESHOLDS) / max(1, len(train_diff))
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
