"""Identification metrics (IJB 1:N, TinyFace, docs/methods.md §5.3, §5.4).

* :func:`closed_set_ranks` / :func:`cmc`: rank of each probe's best mate among a gallery that may hold
  a million distractors, scored in chunks so memory stays bounded.
* :func:`tpir_at_fpir`: the IJB 1:N "TPIR at FPIR" of insightface's evaluation (docs/methods.md §5.3), whose
  threshold is the k-th largest non-mate score of mated probes; :func:`open_set_tpir_at_fpir`: the NIST
  open-set definition, whose threshold comes from probes that have no mate in the gallery.

Scores are computed in the precision of the features: float32 features give float32 scores, and float64
features (IJB templates) float64 scores, so that no rounding ties scores which the reference computation
(insightface's float64 templates) keeps apart. ROC and TAR@FAR are in :mod:`evaluation.verification`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def _score_dtype(*features: np.ndarray) -> np.dtype:
    """float64 when any of the features is float64 (or integer), else float32."""
    return np.result_type(*(np.asarray(f).dtype for f in features), np.float32)


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
    ``len(probes) x chunk`` floats at once, in float64 when the probes or the gallery are float64, else in
    float32. Every probe must have a mate in the gallery.
    """
    dtype = _score_dtype(probes, gallery)
    probes, gallery = np.asarray(probes, dtype), np.asarray(gallery, dtype)
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    _check_features("probes", probes, probe_ids)
    _check_features("gallery", gallery, gallery_ids)
    missing = np.setdiff1d(probe_ids, gallery_ids)
    if len(missing):
        raise ValueError(
            f"{len(missing)} probe identities have no gallery mate (e.g. {missing[:3].tolist()})"
        )
    mate_score = np.full(len(probes), -np.inf, dtype)
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
            scores = probes @ np.asarray(block[start : start + chunk], dtype).T
            higher += (scores > mate_score[:, None]).sum(axis=1)
    return higher + 1


def cmc(ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Cumulative match characteristic: the fraction of probes whose mate is within the top k."""
    ranks = np.asarray(ranks)
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def _probe_blocks(
    probes: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray, chunk: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(rows, scores of probes[rows] against the whole gallery, mask of their mates) per block of probes."""
    for start in range(0, len(probes), chunk):
        rows = slice(start, min(start + chunk, len(probes)))
        yield rows, probes[rows] @ gallery.T, probe_ids[rows, None] == gallery_ids[None, :]


def _checked(
    probes: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dtype = _score_dtype(probes, gallery)
    probes, gallery = np.asarray(probes, dtype), np.asarray(gallery, dtype)
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    _check_features("probes", probes, probe_ids)
    _check_features("gallery", gallery, gallery_ids)
    return probes, probe_ids, gallery, gallery_ids


def _best_mate(scores: np.ndarray, mate: np.ndarray) -> np.ndarray:
    return np.where(mate, scores, -np.inf).max(axis=1)


def _kth_largest_count(n: int, rate: float) -> int:
    """ceil(n * rate), without the float error that makes e.g. 100 * 0.07 round up to 8."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate {rate} must lie in (0, 1]")
    return max(1, math.ceil(round(n * rate, 9)))


def tpir_at_fpir(
    probes: np.ndarray,
    probe_ids: np.ndarray,
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    fpirs: Iterable[float] = (0.01, 0.1),
    chunk: int = 4096,
) -> dict[float, dict[str, float]]:
    """TPIR at each FPIR as insightface's IJB 1:N evaluation computes it (docs/methods.md §5.3), for a
    gallery in which every probe has a mate: ``{fpir: {"tpir": ..., "threshold": ...}}``.

    The similarity is the inner product. The threshold for a target FPIR is the k-th largest of all
    non-mate scores (probe x gallery entries of other identities), k = ceil(#probes x FPIR); TPIR is
    the fraction of probes whose mate score (the best one if the gallery holds several entries of its
    identity) lies strictly above it. This approximates the NIST open-set protocol
    (:func:`open_set_tpir_at_fpir`): there, only probes *without* a mate set the threshold and a hit
    must also be at rank 1. Scores are computed ``chunk`` probes at a time.
    """
    probes, probe_ids, gallery, gallery_ids = _checked(probes, probe_ids, gallery, gallery_ids)
    missing = np.setdiff1d(probe_ids, gallery_ids)
    if len(missing):
        raise ValueError(
            f"{len(missing)} probe identities have no gallery mate (e.g. {missing[:3].tolist()})"
        )
    fpirs = [float(f) for f in fpirs]
    ks = {f: _kth_largest_count(len(probes), f) for f in fpirs}
    k_max = max(ks.values())
    mate_score = np.empty(len(probes), probes.dtype)
    top = np.empty(0, probes.dtype)  # the k_max largest non-mate scores so far
    for rows, scores, mate in _probe_blocks(probes, probe_ids, gallery, gallery_ids, chunk):
        mate_score[rows] = _best_mate(scores, mate)
        top = np.concatenate([top, scores[~mate]])
        if len(top) > k_max:
            top = np.partition(top, len(top) - k_max)[-k_max:]
    if len(top) < k_max:
        raise ValueError(f"FPIR {max(fpirs)} needs {k_max} non-mate scores; the gallery gives {len(top)}")
    top = np.sort(top)[::-1]
    results = {}
    for fpir, k in ks.items():
        threshold = float(top[k - 1])
        results[fpir] = {"tpir": float(np.mean(mate_score > threshold)), "threshold": threshold}
    return results


def open_set_tpir_at_fpir(
    probes: np.ndarray,
    probe_ids: np.ndarray,
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    fpirs: Iterable[float] = (0.01, 0.1),
    chunk: int = 4096,
) -> dict[float, dict[str, float]]:
    """Open-set identification (NIST FRVT / IJB-C test 4 definition) against one gallery:
    ``{fpir: {"tpir": ..., "threshold": ...}}``.

    Probes whose identity is in the gallery are *mated*, the others *non-mated*. The threshold for a
    target FPIR is the k-th largest top-1 score of the non-mated probes, k = ceil(#non-mated x FPIR), so
    that fewer than that fraction of them raise an alarm above it; TPIR is the fraction of mated probes
    whose best mate is at rank 1 (no other identity scores strictly higher) and scores strictly above
    the threshold. IJB-B/C evaluate this once per gallery (S1/S2, G1/G2) with the mixed probe set.
    """
    probes, probe_ids, gallery, gallery_ids = _checked(probes, probe_ids, gallery, gallery_ids)
    mated = np.isin(probe_ids, gallery_ids)
    if mated.all() or not mated.any():
        raise ValueError(
            f"open-set identification needs mated and non-mated probes; {int(mated.sum())} of "
            f"{len(probes)} probes have a mate in the gallery"
        )
    fpirs = [float(f) for f in fpirs]
    top1 = np.empty(int((~mated).sum()), probes.dtype)  # best score of each non-mated probe
    for rows, scores, _ in _probe_blocks(probes[~mated], probe_ids[~mated], gallery, gallery_ids, chunk):
        top1[rows] = scores.max(axis=1)
    top1 = np.sort(top1)[::-1]
    mated_probes, mated_ids = probes[mated], probe_ids[mated]
    ranks = closed_set_ranks(mated_probes, mated_ids, gallery, gallery_ids, chunk=chunk)
    mate_score = np.empty(len(mated_probes), probes.dtype)
    for rows, scores, mate in _probe_blocks(mated_probes, mated_ids, gallery, gallery_ids, chunk):
        mate_score[rows] = _best_mate(scores, mate)
    results = {}
    for fpir in fpirs:
        threshold = float(top1[_kth_largest_count(len(top1), fpir) - 1])
        hit = (ranks == 1) & (mate_score > threshold)
        results[fpir] = {"tpir": float(hit.mean()), "threshold": threshold}
    return results
