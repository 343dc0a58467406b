"""Masked verification: the histogram-crossing threshold, the confusion matrix, and the CLI end to end with
a real pretrained model on real LFW pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from data.verification import read_bin_raw, write_bin
from evaluation.verification import evaluate_pairs
from validation_hq import masked


def crossing_by_hand(same: np.ndarray, diff: np.ndarray, bins: int = 100) -> float:
    """The least-difference rule written out with loops: common bins over [floor(min), ceil(max)], counts,
    the least different bin from the same-pairs' mode up to (not including) the different-pairs' mode.
    (The default, the FYP's first-crossing rule, is checked against the FYP's own code in
    test_seed_fidelity_cd_masked.py.)"""
    every = list(same) + list(diff)
    low, high = math.floor(min(every)), math.ceil(max(every))
    high = high if high > low else low + 1
    width = (high - low) / bins

    def counts(values):
        c = [0] * bins
        for x in values:
            c[min(int((x - low) / width), bins - 1)] += 1
        return c

    cs, cd = counts(same), counts(diff)
    a, b = cs.index(max(cs)), cd.index(max(cd))
    window = range(a, b) if a < b else range(bins)
    best = min(window, key=lambda k: (abs(cs[k] - cd[k]), k))
    return low + (best + 0.5) * width


@pytest.mark.parametrize("seed", range(6))
def test_least_difference_crossing_equals_the_rule_written_out(seed):
    rng = np.random.default_rng(seed)
    n_same, n_diff = rng.integers(50, 400, size=2)
    # seed 5: same pairs farther than different ones, so the whole range is searched
    mu_same, mu_diff = (1.4, 0.7) if seed == 5 else (rng.uniform(0.5, 0.9), rng.uniform(1.1, 1.5))
    same = np.clip(rng.normal(mu_same, rng.uniform(0.08, 0.2), n_same), 0, 2)
    diff = np.clip(rng.normal(mu_diff, rng.uniform(0.08, 0.2), n_diff), 0, 2)
    # distances on bin edges and repeated values exercise the binning and the ties
    same[:5] = [0.5, 0.5, 1.0, 1.0, 1.02]
    result = masked.crossing_threshold(same, diff, rule="least")
    assert result["threshold"] == pytest.approx(crossing_by_hand(same, diff), rel=1e-12)
    assert result["same_hist"].sum() == n_same and result["diff_hist"].sum() == n_diff
    assert result["separated"] == (seed != 5)


def gaussian_crossing(m1: float, s1: float, m2: float, s2: float) -> float:
    """Where two equally weighted normal densities cross between their means (the closed form)."""
    a = 1 / (2 * s1**2) - 1 / (2 * s2**2)
    b = m2 / s2**2 - m1 / s1**2
    c = m1**2 / (2 * s1**2) - m2**2 / (2 * s2**2) - math.log(s2 / s1)
    roots = np.roots([a, b, c])
    return float(next(r.real for r in roots if m1 < r.real < m2))


@pytest.mark.parametrize("rule", ["first", "least"])
@pytest.mark.parametrize(("m1", "s1", "m2", "s2"), [(0.8, 0.12, 1.3, 0.12), (0.8, 0.08, 1.35, 0.16)])
def test_crossing_threshold_finds_where_the_densities_cross(m1, s1, m2, s2, rule):
    rng = np.random.default_rng(1)
    same, diff = rng.normal(m1, s1, 200_000), rng.normal(m2, s2, 200_000)
    result = masked.crossing_threshold(np.clip(same, 0, 2), np.clip(diff, 0, 2), rule=rule)
    width = result["edges"][1] - result["edges"][0]  # 2/100: the range is [0, 2]
    assert width == pytest.approx(0.02)
    offset = result["threshold"] - gaussian_crossing(m1, s1, m2, s2)
    # least: the centre of the bin holding the crossing; first: the centre of the bin below that one
    low, high = (-0.5, 0.5) if rule == "least" else (-1.0, 0.0)
    assert low * width - 0.25 * width <= offset <= high * width + 0.25 * width


def test_confusion_matrix_and_pair_test_on_known_features():
    rng = np.random.default_rng(0)
    n = 60
    issame = np.arange(n) % 3 != 0
    # unit vectors in the plane: the distance of angles a, b is 2 sin(|a - b| / 2)
    gaps = np.where(issame, rng.uniform(0.2, 1.2, n), rng.uniform(0.9, 2.4, n))
    start = rng.uniform(0, 2 * np.pi, n)
    angles = np.stack([start, start + gaps], axis=1).ravel()
    features = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    result = masked.pair_test(features, issame)
    assert np.allclose(result["distances"], 2 * np.sin(gaps / 2))
    predict = result["distances"] <= result["threshold"]
    (tn, fp), (fn, tp) = confusion_matrix(issame, predict)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (tp, fp, tn, fn)
    assert result["accuracy"] == pytest.approx((tp + tn) / n) and tp + fp + tn + fn == n
    assert result["tpr"] == pytest.approx(tp / (tp + fn)) and result["fpr"] == pytest.approx(fp / (fp + tn))
    assert result["ten_fold_accuracy"] == evaluate_pairs(features, issame)["accuracy"]
    with pytest.raises(ValueError, match="need same and different pairs, got 20 same and 0 different"):
        masked.crossing_threshold(np.ones(20), np.array([]))


def test_masked_lfw_pairs_with_a_pretrained_model(shared_data, tmp_path, capsys):
    # 40 real LFW pairs spread over the set (20 same, 20 different), MobileFaceNet (BGR input), no flip
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    bins, issame = read_bin_raw(shared_data / "lfw_yunet112.bin")
    picks = np.r_[np.arange(0, 300, 15), np.arange(300, 600, 15)]  # fold 1: 300 same, then 300 different
    write_bin(tmp_path / "lfw40.bin", [bins[j] for i in picks for j in (2 * i, 2 * i + 1)], issame[picks])
    argv = ["--model", str(model), "--color", "bgr", "--bin", str(tmp_path / "lfw40.bin"), "--fusion", "none",
            "--mask", "none", "one", "both", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "h.png")]  # fmt: skip
    assert masked.main(argv) == 0
    out = capsys.readouterr().out
    assert "lfw40: mask" in out and "both" in out
    report = json.loads((tmp_path / "r.json").read_text())
    none, one, both = (report["results"][m] for m in ("none", "one", "both"))
    for r in (none, one, both):
        assert r["pairs"] == 40 and r["tp"] + r["fn"] == 20 and r["fp"] + r["tn"] == 20
        assert r["accuracy"] == pytest.approx((r["tp"] + r["tn"]) / 40)
    assert none["ten_fold_accuracy"] >= 0.95 and none["accuracy"] >= 0.85  # crossing: fitted in-sample
    # masks make the same person look less alike: the separation falls, yet stays far above chance
    for r in (one, both):
        assert r["same_distance_mean"] > none["same_distance_mean"] + 0.05
        assert r["d_prime"] < none["d_prime"] - 0.5
        assert r["ten_fold_accuracy"] <= none["ten_fold_accuracy"] and r["accuracy"] > 0.65
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert masked.main([*argv[:6], "--pairs", "5"]) == 2
    assert "--pairs 5: need 10" in capsys.readouterr().err
