"""IJB-B / IJB-C protocol arithmetic (docs/methods.md §5.3): image features under the N/D/F switches, template
pooling over media, 1:1 template-pair scores and TAR@FAR, 1:N identification.

The switches, as insightface's ``eval_ijbc.py`` names them (``use_norm_score``, ``use_detector_score``,
``use_flip_test``), are applied to every image feature in this order:

* F1: feature = f(image) + f(flipped image) (un-normalised sum); F0: f(image) alone;
* N1: keep that feature's norm (a quality cue the network learned); N0: L2-normalise it;
* D1: multiply it by the detector's faceness score of the image; D0: leave it.

arcface_torch reports N1 D1 F1; AdaFace, FRABSM and the closeness-diversity repo use N1 D0 F1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from evaluation.identification import closed_set_ranks, cmc, open_set_tpir_at_fpir, tpir_at_fpir
from evaluation.verification import FARS, roc_curve, tar_at_far
from validation_ijb.meta import TemplateList

FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)


@dataclass(frozen=True)
class Mode:
    """One setting of the N/D/F switches."""

    norm_score: bool = True
    detector_score: bool = True
    flip: bool = True

    @property
    def name(self) -> str:
        return f"N{self.norm_score:d}D{self.detector_score:d}F{self.flip:d}"

    @classmethod
    def parse(cls, text: str) -> Mode:
        """``"N1D0F1"`` (any case) -> Mode(norm_score=True, detector_score=False, flip=True)."""
        match = re.fullmatch(r"N([01])D([01])F([01])", text.strip().upper())
        if match is None:
            raise ValueError(f"mode {text!r}: expected N<0|1>D<0|1>F<0|1>, e.g. N1D1F1")
        return cls(*(c == "1" for c in match.groups()))


def image_features(
    original: np.ndarray, flipped: np.ndarray | None, faceness: np.ndarray, mode: Mode
) -> np.ndarray:
    """Per-image features (N, D) float32 under the switches of ``mode`` (see the module notes)."""
    original = np.asarray(original, np.float32)
    if mode.flip:
        if flipped is None:
            raise ValueError(f"{mode.name} needs the features of the flipped images (F1)")
        if np.shape(flipped) != original.shape:
            raise ValueError(f"flipped features {np.shape(flipped)} do not match {original.shape}")
        feats = original + np.asarray(flipped, np.float32)
    else:
        feats = original.copy()
    if not mode.norm_score:
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    if mode.detector_score:
        faceness = np.asarray(faceness, np.float32)
        if faceness.shape != (len(feats),):
            raise ValueError(f"{faceness.shape} faceness scores for {len(feats)} images")
        feats *= faceness[:, None]
    return feats


def template_features(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, their L2-normalised features (T, D) float64) by media pooling.

    Within a template, the features of images that share a media id (frames of one video, or one photo
    listed twice) are averaged into one media feature; the template feature is the sum of its media
    features, L2-normalised. Sums, templates and every score computed from them stay in float64, as in
    insightface's scripts: rounding templates or scores to float32 ties distinct scores (hundreds of
    impostor pairs on a 439-person tree), and a tie adds a point to the thinned ROC that can become the
    nearest one to a target FAR (docs/methods.md §5.3).

    ``weights`` (optional, (N,) non-negative, one per image) multiplies each image's feature before the
    pooling, exactly as the detector score does under D1: a media feature becomes
    ``sum_i w_i f_i / n_media``. Only relative weights matter (the template is normalised at the end),
    so an uncertainty estimate can be plugged in directly, e.g. ProbFace's ``w_i = 1 / sigma_i^2`` (mean
    of the per-dimension variances), which turns the template into the precision-weighted mean direction.
    """
    features = np.asarray(features)
    templates, medias = np.asarray(templates), np.asarray(medias)
    n = len(features)
    if features.ndim != 2 or templates.shape != (n,) or medias.shape != (n,):
        raise ValueError(
            f"{features.shape} features for {templates.shape} template ids and {medias.shape} media ids"
        )
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"weights must be {n} finite non-negative numbers, got shape {weights.shape}")
    order = np.lexsort((medias, templates))
    t, m = templates[order], medias[order]
    feats = features[order]  # one copy in the input's precision (IJB-C: 469k x 512)
    if weights is not None:
        feats = feats * weights[order, None].astype(feats.dtype)
    new_media = np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])]
    media_start = np.flatnonzero(new_media)
    counts = np.diff(np.r_[media_start, n])
    media_feats = np.add.reduceat(feats, media_start, axis=0, dtype=np.float64) / counts[:, None]
    media_template = t[media_start]
    template_start = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    pooled = np.add.reduceat(media_feats, template_start, axis=0)
    ids = media_template[template_start]
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    empty = np.flatnonzero(~(norms[:, 0] > 0))
    if len(empty):
        raise ValueError(
            f"{len(empty)} templates have a zero or undefined feature (e.g. template {int(ids[empty[0]])}):"
            " all their weights or detector scores are 0, or their features are not finite"
        )
    return ids, pooled / norms


def template_rows(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of the ``wanted`` template ids in the sorted ``ids``; an unknown id is an error naming it."""
    wanted = np.asarray(wanted)
    rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    missing = ids[rows] != wanted
    if missing.any():
        raise ValueError(f"{what}: template {int(wanted[missing][0])} has no images")
    return rows


def pair_scores(
    ids: np.ndarray, feats: np.ndarray, t1: np.ndarray, t2: np.ndarray, block: int = 1024
) -> np.ndarray:
    """Cosine of the (unit) template features of each listed pair, in the features' precision (float64
    from :func:`template_features`; 125 MB for the 15.7 M pairs of IJB-C).

    Gathering two feature rows per pair would move tens of gigabytes at IJB-C scale; instead the pairs are
    grouped by their first template and scored from ``block`` x ``len(ids)`` similarity blocks (at most
    ``block * len(ids)`` numbers at once, 190 MB in float64 for IJB-C's 23 k templates), about four times
    faster on a CPU.
    """
    rows1, rows2 = template_rows(ids, t1, "1:1 pairs"), template_rows(ids, t2, "1:1 pairs")
    order = np.argsort(rows1, kind="stable")
    r1, r2 = rows1[order], rows2[order]
    bounds = np.searchsorted(r1, np.arange(0, len(ids) + block, block))
    scores = np.empty(len(r1), np.result_type(feats.dtype, np.float32))
    for b, start in enumerate(range(0, len(ids), block)):
        lo, hi = bounds[b], bounds[b + 1]
        if lo < hi:
            sims = feats[start : start + block] @ feats.T
            scores[order[lo:hi]] = sims[r1[lo:hi] - start, r2[lo:hi]]
    return scores


def verification(scores: np.ndarray, labels: np.ndarray, fars: Iterable[float] = FARS) -> dict:
    """TAR at each FAR (insightface's reading of the sklearn ROC) and the ROC points themselves."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return {
        "pairs": len(scores),
        "genuine": int(np.sum(labels)),
        "tar_at_far": tar_at_far(fpr, tpr, fars),
        "fpr": fpr,
        "tpr": tpr,
    }


def identification(
    ids: np.ndarray,
    feats: np.ndarray,
    galleries: dict[str, TemplateList],
    probes: TemplateList,
    ranks: Iterable[int] = RANKS,
    fpirs: Iterable[float] = FPIRS,
) -> dict:
    """1:N results: the gallery is the union of ``galleries`` (S1 ∪ S2, G1 ∪ G2) and the probes are the
    mixed probe templates; similarity = inner product of the template features.

    * ``rank``: CMC at ``ranks`` (rank of the probe's best mate; ties count for the probe);
    * ``tpir_at_fpir``: insightface's figure (docs/methods.md §5.3,
      :func:`evaluation.identification.tpir_at_fpir`);
    * ``open_set``: the NIST definition per gallery (:func:`evaluation.identification.open_set_tpir_at_fpir`),
      where the probes of subjects outside that gallery are the non-mated searches; a gallery whose
      probes are all mated (or none) has a ``reason`` instead.
    """
    fpirs = tuple(fpirs)
    g_templates = np.concatenate([g.templates for g in galleries.values()])
    g_subjects = np.concatenate([g.subjects for g in galleries.values()])
    g_templates, first = np.unique(g_templates, return_index=True)
    g_subjects = g_subjects[first]
    g_feats = feats[template_rows(ids, g_templates, "1:N gallery")]
    p_feats = feats[template_rows(ids, probes.templates, "1:N probes")]
    # gallery columns in chunks of 1024: IJB-C's 19.6 k probes x 1024 float64 scores is 160 MB at once
    found = closed_set_ranks(p_feats, probes.subjects, g_feats, g_subjects, chunk=1024)
    results = {
        "probes": len(p_feats),
        "gallery": len(g_feats),
        "rank": cmc(found, ranks),
        "tpir_at_fpir": tpir_at_fpir(p_feats, probes.subjects, g_feats, g_subjects, fpirs),
        "open_set": {},
    }
    for name, gallery in galleries.items():
        mated = int(np.isin(probes.subjects, gallery.subjects).sum())
        entry: dict = {"mated": mated, "non_mated": len(p_feats) - mated}
        if 0 < mated < len(p_feats):
            rows = template_rows(ids, gallery.templates, f"1:N gallery {name}")
            entry["tpir_at_fpir"] = open_set_tpir_at_fpir(
                p_feats, probes.subjects, feats[rows], gallery.subjects, fpirs
            )
        else:
            entry["reason"] = f"{mated} of {len(p_feats)} probes are mated in {name}; needs both kinds"
        results["open_set"][name] = entry
    return results
