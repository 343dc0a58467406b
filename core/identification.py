"""Verification and identification metrics shared by the IJB, TinyFace and MegaFace evaluators.

* :func:`roc_curve` / :func:`tar_at_far`: the ROC of similarity scores (higher = more alike) as
  scikit-learn's ``roc_curve`` computes it, and TAR at target FARs the way insightface's IJB script reads
  it (the ROC point whose FPR is closest to the target; the larger TPR wins ties).
* :func:`closed_set_ranks` / :func:`cmc`: rank of each probe's best mate among a gallery that may hold
  a million distractors, scored in chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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


def _check_features(name: str, features: np.ndarray, ids: np.ndarray) -> None:
    if features.ndim != 2 or len(features) != len(ids):
        raise ValueError(f"{name}: {features.shape} features for {len(ids)} identities; need (N, D)")


def closed_set_ranks(
    probes: np.ndarray,
    probe_ids: np.ndarray,
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    distractors: Sequence[np.ndarray] | np.ndarray = (),
    chunk: int = 65536,
) -> np.ndarray:
    """1-based rank of each probe's best mate (highest inner product over gallery entries of its
    identity) among the gallery entries of other identities and the distractor features.

    Rank = 1 + the number of non-mate entries scoring strictly above the best mate (ties count for the
    probe). ``distractors`` is an array or a sequence of arrays (e.g. memory-mapped ``.npy`` blocks);
    scores are computed ``chunk`` rows at a time, so a million distractors need
    ``len(probes) x chunk`` floats at once. Every probe must have a mate in the gallery.
    """
    probes, gallery = np.asarray(probes, np.float32), np.asarray(gallery, np.float32)
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    _check_features("probes", probes, probe_ids)
    _check_features("gallery", gallery, gallery_ids)
    missing = np.setdiff1d(probe_ids, gallery_ids)
    if len(missing):
        raise ValueError(
            f"{len(missing)} probe identities have no gallery mate (e.g. {missing[:3].tolist()})"
        )
    mate_score = np.full(len(probes), -np.inf, np.float32)
    higher = np.zeros(len(probes), np.int64)
    blocks = [distractors] if isinstance(distractors, np.ndarray) else list(distractors)
    # Pass 1: the best mate score of every probe (gallery only).
    for start in range(0, len(gallery), chunk):
        scores = probes @ gallery[start : start + chunk].T
        mate = probe_ids[:, None] == gallery_ids[None, start : start + chunk]
        mate_score = np.maximum(mate_score, np.where(mate, scores, -np.inf).max(axis=1))
    # Pass 2: count non-mate gallery entries and distractors above it.
    for start in range(0, len(gallery), chunk):
        scores = probes @ gallery[start : start + chunk].T
        mate = probe_ids[:, None] == gallery_ids[None, start : start + chunk]
        higher += ((scores > mate_score[:, None]) & ~mate).sum(axis=1)
    for block in blocks:
        if block.ndim != 2 or block.shape[1] != probes.shape[1]:
            raise ValueError(f"distractor block of shape {block.shape}; need (N, {probes.shape[1]})")
        for start in range(0, len(block), chunk):
            scores = probes @ np.asarray(block[start : start + chunk], np.float32).T
            higher += (scores > mate_score[:, None]).sum(axis=1)
    return higher + 1


def cmc(ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Cumulative match characteristic: the fraction of probes whose mate is within the top k."""
    ranks = np.asarray(ranks)
    return {int(k): float(np.mean(ranks <= k)) for k in ks}
