"""ROC, TAR@FAR and closed-set ranks against scikit-learn and a direct (unchunked) computation."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sklearn_roc_curve

from evaluation.identification import closed_set_ranks, cmc
from evaluation.verification import roc_curve, tar_at_far


@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_equals_sklearn(drop):
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=2000), 2)  # many ties
    labels = rng.random(2000) < 0.3
    ours = roc_curve(scores, labels, drop_intermediate=drop)
    theirs = sklearn_roc_curve(labels, scores, drop_intermediate=drop)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b)


def test_tar_at_far_takes_nearest_point_and_larger_tpr_on_ties():
    fpr = np.array([0.0, 0.001, 0.001, 0.01, 0.1, 1.0])
    tpr = np.array([0.0, 0.50, 0.60, 0.80, 0.90, 1.0])
    tar = tar_at_far(fpr, tpr, [1e-3, 1e-2, 0.05, 0.5])
    assert tar == {1e-3: 0.6, 1e-2: 0.8, 0.05: 0.8, 0.5: 0.9}


def test_roc_refuses_one_sided_or_nan_scores():
    with pytest.raises(ValueError, match="both genuine"):
        roc_curve(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.array([0.1, np.nan]), np.array([0, 1]))


def _direct_ranks(probes, probe_ids, gallery, gallery_ids, distractors):
    ranks = []
    for p, pid in zip(probes, probe_ids, strict=True):
        scores = gallery @ p
        mate = scores[gallery_ids == pid].max()
        others = np.r_[scores[gallery_ids != pid], distractors @ p]
        ranks.append(1 + int((others > mate).sum()))
    return np.array(ranks)


def test_closed_set_ranks_equal_direct_computation_in_any_chunking():
    rng = np.random.default_rng(1)
    ids = np.arange(20)
    centres = rng.normal(size=(20, 16))
    gallery_ids = np.repeat(ids, 2)
    gallery = centres[gallery_ids] + rng.normal(scale=0.8, size=(40, 16))
    probe_ids = rng.integers(0, 20, 30)
    probes = centres[probe_ids] + rng.normal(scale=0.8, size=(30, 16))
    distractors = rng.normal(size=(500, 16))
    expected = _direct_ranks(probes, probe_ids, gallery, gallery_ids, distractors)
    assert expected.max() > 1 and (expected == 1).any()  # a case with hits and misses
    for chunk in (7, 64, 100000):
        ranks = closed_set_ranks(
            probes, probe_ids, gallery, gallery_ids, [distractors[:123], distractors[123:]], chunk=chunk
        )
        np.testing.assert_array_equal(ranks, expected)
    assert cmc(expected, [1, 5]) == {1: np.mean(expected <= 1), 5: np.mean(expected <= 5)}


def test_closed_set_ranks_refuses_probe_without_mate():
    with pytest.raises(ValueError, match="no gallery mate"):
        closed_set_ranks(np.ones((1, 2)), np.array([3]), np.ones((1, 2)), np.array([4]))
