"""Error-versus-discard characteristic (evaluation.quality, validation_hq.quality, validation_ijb.quality).

Every figure is checked against a direct computation written here by sorting and counting: the FMR threshold
as the smallest impostor score that at most k impostors exceed, the FNMR after a discard by counting the
false non-matches among the genuine pairs whose quality reaches a cut, and the pAUC by adding up those
counts over the discard counts. The real scores are those of the pretrained MobileFaceNet ONNX on the 6,000
LFW pairs of ``lfw_yunet112.bin`` (flip-sum cosine, un-normalised feature norm and YuNet's face score on the
raw photo of each image), saved by

    python -m validation_hq.quality --model ../shared/data/models/onnx/mobilefacenet_paddle_128d.onnx \
        --color bgr --bin ../shared/data/lfw_yunet112.bin --photos ../shared/data/lfw_color150 \
        --pairs ../shared/data/lfw_pairs.txt --quality norm detector --dump lfw.npz

its ``scores``, ``genuine``, ``image_norm`` and ``image_detector`` as ``scores``, ``genuine``, ``norm`` and
``detector`` of ``fixtures/quality/lfw_mobilefacenet.npz`` (float32); the command-line test runs that same
pipeline on 18 of those pairs and must reproduce the saved values.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data.verification import read_bin_raw, read_pairs, write_bin
from evaluation import quality
from validation_hq import quality as hq_quality
from validation_ijb import quality as ijb_quality

FIXTURE = Path(__file__).parent / "fixtures" / "quality" / "lfw_mobilefacenet.npz"
ONNX = Path("models") / "onnx" / "mobilefacenet_paddle_128d.onnx"


# ------------------------------------------------------------------------------ direct computations


def direct_threshold(impostor: np.ndarray, fmr: float) -> tuple[float, int]:
    """The smallest impostor score that at most floor(fmr * n) impostor scores exceed, and that count."""
    allowed = int(np.floor(fmr * len(impostor) + 1e-6))
    for s in np.unique(impostor):  # ascending: the first that qualifies is the smallest
        above = int(np.sum(impostor > s))
        if above <= allowed:
            return float(s), above
    raise AssertionError("unreachable: the largest score is exceeded by none")


def direct_fnmr(gen_scores: np.ndarray, gen_quality: np.ndarray, threshold: float, fraction: float) -> float:
    """FNMR of the genuine pairs kept after discarding at most ``fraction`` of them by a quality cut."""
    n, cut = len(gen_quality), None
    for v in np.unique(gen_quality):
        if np.sum(gen_quality < v) <= fraction * n + 1e-9:
            cut = v
    kept = gen_quality >= cut
    return float(np.sum(gen_scores[kept] <= threshold) / kept.sum())


def direct_pauc(gen_scores: np.ndarray, gen_quality: np.ndarray, threshold: float, limit: float) -> float:
    """Sum over discard counts c < limit * n of FNMR(after discarding c) / n, where a count between two
    quality cuts keeps the FNMR of the cut below it (pairs of equal quality go together)."""
    n = len(gen_quality)
    order = np.argsort(gen_quality, kind="stable")
    q, err = gen_quality[order], gen_scores[order] <= threshold
    area, current = 0.0, None
    for c in range(math.ceil(limit * n - 1e-9)):
        if c == 0 or q[c] != q[c - 1]:  # a cut: every pair below q[c] discarded, the rest kept
            current = err[c:].sum() / (n - c)
        area += current * (min(c + 1, limit * n) - c) / n
    return float(area)


def make_scores(rng: np.random.Generator, genuine: int, impostors: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.r_[rng.normal(0.4, 0.15, genuine), rng.normal(0.0, 0.1, impostors)]
    return scores, np.r_[np.ones(genuine, bool), np.zeros(impostors, bool)]


# --------------------------------------------------------------------------------- hand-made cases


def test_threshold_allows_floor_fmr_times_impostors_false_matches_and_ties_count_against_it():
    impostor = np.array([0.9, 0.8, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    scores, genuine = np.r_[impostor, [0.85, 0.75]], np.r_[np.zeros(10, bool), [True, True]]
    p = quality.operating_point(scores, genuine, 0.1)
    assert (p.threshold, p.allowed, p.false_matches, p.fmr) == (0.8, 1, 1, 0.1)
    assert (p.false_non_matches, p.fnmr) == (1, 0.5)  # 0.75 <= 0.8
    p = quality.operating_point(scores, genuine, 0.2)  # k = 2, but 0.8 is tied: only 1 impostor above
    assert (p.threshold, p.allowed, p.false_matches) == (0.8, 2, 1)
    p = quality.operating_point(scores, genuine, 0.3)
    assert (p.threshold, p.false_matches, p.false_non_matches) == (0.7, 3, 0)
    with pytest.raises(quality.QualityError, match=r"10 impostor pairs allow 0 false matches at FMR 0.01"):
        quality.operating_point(scores, genuine, 0.01)
    assert quality.too_few_impostors(3000, 1e-3) is None  # 3000 * 1e-3 rounds to 3.0000000000000004
    assert quality.allowed_false_matches(3000, 1e-3) == 3
    assert (
        quality.too_few_impostors(9999, 1e-4) is not None and quality.too_few_impostors(10000, 1e-4) is None
    )
    assert "at least 30000 impostor pairs" in quality.too_few_impostors(10000, 1e-4, min_false_matches=3)


def test_perfect_quality_discards_the_false_non_matches_first():
    # 10 genuine pairs, threshold 0.5: pairs 0, 4, 7 are false non-matches and have the lowest qualities
    gen = np.array([0.1, 0.9, 0.8, 0.7, 0.5, 0.95, 0.6, 0.2, 0.99, 0.66])
    q = np.array([1.0, 10, 9, 8, 2, 7, 6, 3, 5, 4])
    curve = quality.edc(gen, q, 0.5)
    expected = [3 / 10, 2 / 9, 1 / 8] + [0.0] * 7
    np.testing.assert_allclose(curve.discard, np.r_[np.arange(10) / 10, 1.0])
    np.testing.assert_allclose(curve.fnmr, np.r_[expected, 0.0])
    assert curve.at(0.0) == 0.3 and curve.at(0.15) == pytest.approx(2 / 9) and curve.at(0.3) == 0.0
    assert curve.pauc(0.2) == pytest.approx(0.1 * 0.3 + 0.1 * 2 / 9)
    assert curve.pauc(0.25) == pytest.approx(0.1 * 0.3 + 0.1 * 2 / 9 + 0.05 * 1 / 8)
    worst = quality.edc(gen, -q, 0.5)  # the same quality reversed: the errors are kept to the end
    assert worst.at(0.6) == pytest.approx(3 / 4) and worst.pauc(0.2) > 0.3 * 0.2


def test_equal_qualities_are_discarded_together():
    gen = np.array([0.1, 0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9])  # errors: pairs 0 and 4
    q = np.array([1.0, 1, 1, 1, 2, 3, 3, 4, 5, 6])
    curve = quality.edc(gen, q, 0.5)
    np.testing.assert_allclose(curve.discard, [0.0, 0.4, 0.5, 0.7, 0.8, 0.9, 1.0])
    np.testing.assert_allclose(curve.fnmr, [0.2, 1 / 6, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert curve.at(0.39) == 0.2  # no cut between the four pairs of quality 1
    assert curve.pauc(0.45) == pytest.approx(0.4 * 0.2 + 0.05 / 6)
    flat = quality.edc(gen, np.ones(10), 0.5)  # one quality for all: nothing can be discarded
    np.testing.assert_allclose(flat.discard, [0.0, 1.0])
    assert flat.pauc(0.2) == pytest.approx(0.2 * 0.2)


def test_random_quality_stays_near_the_random_baseline():
    rng = np.random.default_rng(0)
    scores, genuine = make_scores(rng, 40_000, 20_000)
    noise = {"random": rng.random(60_000), "perfect": np.where(genuine, scores, 0.0)}
    r = quality.evaluate_edc(scores, genuine, noise, fmrs=[1e-2], limit=0.2)["0.01"]
    assert r["fnmr"] > 0.05  # a task with errors to remove
    assert r["random"]["pauc"] == pytest.approx(r["fnmr"] * 0.2)
    assert r["qualities"]["random"]["pauc_relative"] == pytest.approx(1.0, abs=0.04)
    assert r["qualities"]["perfect"]["fnmr_at_discard"]["0.2"] == 0.0  # the score itself as the quality
    assert r["qualities"]["perfect"]["pauc_relative"] < 0.5


def test_evaluate_edc_matches_the_direct_computation_on_synthetic_ties():
    rng = np.random.default_rng(1)
    scores, genuine = make_scores(rng, 500, 2000)
    image_q = np.round(rng.random(1000), 1)  # 11 values: many ties
    pair_q = quality.pair_quality(
        np.r_[image_q[:500], rng.random(2000)], np.r_[image_q[500:], rng.random(2000)]
    )
    np.testing.assert_array_equal(pair_q[:500], np.minimum(image_q[:500], image_q[500:]))
    r = quality.evaluate_edc(scores, genuine, {"q": pair_q}, fmrs=[1e-3, 1e-4], limit=0.3)
    assert r["0.0001"] == {"omitted": quality.too_few_impostors(2000, 1e-4)}
    t, above = direct_threshold(scores[~genuine], 1e-3)
    assert (r["0.001"]["threshold"], r["0.001"]["false_matches"]) == (t, above)
    gen_s, gen_q = scores[genuine], pair_q[genuine]
    q = r["0.001"]["qualities"]["q"]
    assert q["pauc"] == pytest.approx(direct_pauc(gen_s, gen_q, t, 0.3), rel=1e-9)
    for x in (0.05, 0.1, 0.2):
        assert q["fnmr_at_discard"][f"{x:g}"] == pytest.approx(direct_fnmr(gen_s, gen_q, t, x), rel=1e-12)


# -------------------------------------------------------------------------------------- real scores


@pytest.fixture(scope="module")
def lfw():
    with np.load(FIXTURE) as saved:
        return {k: saved[k] for k in saved.files}


def test_real_lfw_edc_against_sorting_and_counting(lfw):
    scores, genuine = lfw["scores"].astype(np.float64), lfw["genuine"]
    assert (len(scores), genuine.sum()) == (6000, 3000)
    pair_q = {q: quality.pair_quality(lfw[q][0::2], lfw[q][1::2]) for q in ("norm", "detector")}
    results = quality.evaluate_edc(scores, genuine, pair_q)
    assert "omitted" in results["0.0001"] and "at least 10000 impostor pairs" in results["0.0001"]["omitted"]
    r = results["0.001"]
    t, above = direct_threshold(scores[~genuine], 1e-3)
    assert (r["threshold"], r["false_matches"], r["false_matches_allowed"]) == (t, above, 3)
    fnmr0 = np.sum(scores[genuine] <= t) / 3000
    assert r["fnmr"] == fnmr0 and r["random"]["pauc"] == pytest.approx(0.2 * fnmr0)
    for name, pq in pair_q.items():
        got, gen_q = r["qualities"][name], pq[genuine]
        assert got["pauc"] == pytest.approx(direct_pauc(scores[genuine], gen_q, t, 0.2), rel=1e-9)
        assert got["pauc_relative"] == pytest.approx(got["pauc"] / (0.2 * fnmr0))
        for x in (0.05, 0.1, 0.2):
            assert got["fnmr_at_discard"][f"{x:g}"] == direct_fnmr(scores[genuine], gen_q, t, x)
        curve = np.array(got["curve"]["discard"]), np.array(got["curve"]["fnmr"])
        assert curve[0][0] == 0 and curve[1][0] == fnmr0 and (curve[0][-1], curve[1][-1]) == (1, 0)
        assert len(curve[0]) == len(np.unique(gen_q)) + 1  # one point per distinct pair quality


# ------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def small_lfw(shared_data, lfw, tmp_path_factory):
    """18 of the LFW pairs as their own .bin and pairs file: the 4 genuine pairs the model scores lowest,
    4 other genuine pairs, the 2 highest-scoring impostor pairs and 8 others (by the saved scores)."""
    scores, genuine = lfw["scores"], lfw["genuine"]
    gen, imp = np.flatnonzero(genuine), np.flatnonzero(~genuine)
    low, high = gen[np.argsort(scores[gen])[:4]], imp[np.argsort(scores[imp])[-2:]]
    keep = np.r_[low, np.setdiff1d(gen[::700], low)[:4], high, np.setdiff1d(imp[::350], high)[:8]]
    images, issame = read_bin_raw(shared_data / "lfw_yunet112.bin")
    root = tmp_path_factory.mktemp("quality")
    write_bin(root / "lfw.bin", [images[j] for k in keep for j in (2 * k, 2 * k + 1)], issame[keep].tolist())
    pairs = read_pairs(shared_data / "lfw_pairs.txt")
    lines = [(f"{p.name1} {p.num1} {p.num2}" if p.same else f"{p.name1} {p.num1} {p.name2} {p.num2}")
             for p in (pairs[k] for k in keep)]  # fmt: skip
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    (root / "few_pairs.txt").write_text("\n".join(lines[2:6] + lines[10:14]) + "\n")
    return {"root": root, "keep": keep, "photos": shared_data / "lfw_color150", "model": shared_data / ONNX}


def cli_args(small, *extra: str) -> list[str]:
    root = small["root"]
    return ["--model", str(small["model"]), "--color", "bgr", "--bin", str(root / "lfw.bin"),
            "--photos", str(small["photos"]), "--pairs", str(root / "pairs.txt"), *extra]  # fmt: skip


def test_command_writes_json_plot_and_dump_equal_to_the_saved_pipeline(small_lfw, lfw, tmp_path, capsys):
    keep, out = small_lfw["keep"], tmp_path
    rows = np.stack([2 * keep, 2 * keep + 1], 1).ravel()
    names = [p.stem for p in hq_quality.pair_photos(small_lfw["root"] / "pairs.txt", small_lfw["photos"])[0]]
    mine = out / "mine.csv"  # the saved detector scores by photo name: must give the detector's curve
    by_name = dict(zip(names, lfw["detector"][rows].tolist(), strict=True))
    mine.write_text("path,score\n" + "".join(f"{n},{v!r}\n" for n, v in by_name.items()))
    outputs = ["--json", str(out / "r.json"), "--plot", str(out / "r.png"), "--dump", str(out / "d.npz")]
    qualities = ["--quality", "norm", "detector", "--scores", f"mine={mine}"]
    argv = cli_args(small_lfw, *qualities, "--fmr", "0.1", "1e-4", *outputs)
    assert hq_quality.main(argv) == 0
    captured = capsys.readouterr()
    assert "FMR 0.0001 omitted: 10 impostor pairs allow 0 false matches" in captured.err
    assert "pAUC@0.2" in captured.out and "detector" in captured.out
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "r.json").read_text())
    assert {"set", "pairs", "genuine", "impostors", "qualities", "edc", "settings"} <= set(saved)
    assert set(saved["qualities"]) == {"norm", "detector", "mine"} and saved["settings"]["color"] == "bgr"
    assert saved["edc"]["0.0001"]["omitted"].startswith("10 impostor pairs allow 0 false matches")
    with np.load(out / "d.npz") as dump:
        np.testing.assert_allclose(dump["scores"], lfw["scores"][keep], atol=2e-6)
        np.testing.assert_allclose(dump["image_norm"], lfw["norm"][rows], rtol=2e-6)
        np.testing.assert_allclose(dump["image_detector"], lfw["detector"][rows], rtol=1e-6)
        np.testing.assert_array_equal(dump["genuine"], lfw["genuine"][keep])
    scores, genuine = lfw["scores"][keep].astype(np.float64), lfw["genuine"][keep]
    t, above = direct_threshold(scores[~genuine], 0.1)
    r = saved["edc"]["0.1"]
    assert r["threshold"] == pytest.approx(t, abs=2e-6) and r["false_matches"] == above == 1
    assert r["false_non_matches"] == int(np.sum(scores[genuine] <= t)) >= 4
    for name in ("norm", "detector"):
        image_q = lfw[name][rows].astype(np.float64)
        gen_q = np.minimum(image_q[0::2], image_q[1::2])[genuine]
        assert r["qualities"][name]["pauc"] == pytest.approx(
            direct_pauc(scores[genuine], gen_q, t, 0.2), rel=1e-6
        )
    assert r["qualities"]["mine"] == r["qualities"]["detector"]


def test_command_without_bin_aligns_the_photos(small_lfw, tmp_path):
    argv = ["--model", str(small_lfw["model"]), "--color", "bgr", "--photos", str(small_lfw["photos"]),
            "--pairs", str(small_lfw["root"] / "few_pairs.txt"), "--fusion", "none", "--quality", "detector",
            "--fmr", "0.25", "--dump", str(tmp_path / "d.npz")]  # fmt: skip
    assert hq_quality.main(argv) == 0
    with np.load(tmp_path / "d.npz") as dump:  # the same pairs, embedded from crops made afresh
        assert dump["scores"].shape == (8,) and dump["genuine"].sum() == 4
        assert np.mean(dump["scores"][dump["genuine"]]) > np.mean(dump["scores"][~dump["genuine"]]) + 0.3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scores", "mine=/nonexistent/q.tsv"], r"quality: /nonexistent/q.tsv: scores file not found$"),
        (["--scores", "mine=BAD_NAME"], r":2: no image 'Nobody_0001' among the 36 images of lfw.bin$"),
        (["--scores", "mine=BAD_INDEX"], r":1: no image '36' among the 36 images of lfw.bin$"),
        (["--scores", "mine=PARTIAL"], r": no score for 34 of the 36 images of lfw.bin \(first: image 2\)$"),
        (
            ["--fmr", "1e-4"],
            r"quality: lfw: too small for FMR 0.0001: 10 impostor pairs allow 0 false matches "
            r"at FMR 0.0001; at least 1 are needed \(at least 10000 impostor pairs\)$",
        ),
        (["--quality", "sigma2"], r"--quality sigma2 needs a ProbFace checkpoint \(--probface CKPT\)$"),
        (["--scores", "norm=PARTIAL"], r"the name 'norm' is taken"),
        (["--discard-limit", "0"], r"--discard-limit 0: a fraction in \(0, 1\]$"),
    ],
)
def test_bad_inputs_are_one_line_before_any_model_runs(small_lfw, tmp_path, capsys, extra, message):
    files = {"BAD_NAME": "0 0.5\nNobody_0001 0.2\n", "BAD_INDEX": "36 0.1\n", "PARTIAL": "0 1\n1 2\n"}
    for key, text in files.items():
        (tmp_path / key).write_text(text)
    for key in files:
        extra = [e.replace(key, str(tmp_path / key)) for e in extra]
    assert hq_quality.main(cli_args(small_lfw, "--fmr", "0.1", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_detector_quality_needs_the_photos(small_lfw, capsys):
    argv = [
        "--model",
        str(small_lfw["model"]),
        "--bin",
        str(small_lfw["root"] / "lfw.bin"),
        "--quality",
        "detector",
    ]
    assert hq_quality.main(argv) == 2
    assert (
        "--quality detector needs the raw photos: --photos DIR --pairs pairs.txt" in capsys.readouterr().err
    )


# ----------------------------------------------------------------------------------------- sigma^2


@pytest.fixture(scope="module")
def probface_ckpt(small_lfw, tmp_path_factory) -> Path:
    """A ProbFace checkpoint (MobileFaceNet 16-d on 32 x 32 inputs, per-dimension sigma^2) of random
    weights, its BN statistics set from the small set's faces so that each face has its own last map."""
    from backbones import build_backbone
    from core.checkpoint import save_checkpoint
    from data.transforms import normalize_batch
    from data.verification import load_bin
    from probface.model import UncertaintyModule, conv_final_size

    torch.manual_seed(0)
    backbone = build_backbone("mbf", embedding_size=16, input_size=32)
    uncertainty = UncertaintyModule(conv_final_size(backbone, 32), "per_dim", 16)
    images = load_bin(small_lfw["root"] / "lfw.bin").images
    with torch.no_grad():
        for bn in (m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            bn.momentum = None
        backbone.train()(normalize_batch(torch.from_numpy(images), "rgb", 32))
        backbone.eval()
    meta = {"arch": "mbf", "embedding_size": 16, "input_size": 32, "color": "rgb", "uncertainty": "per_dim"}
    state = {"meta": meta, "backbone": backbone.state_dict(), "uncertainty": uncertainty.state_dict()}
    return save_checkpoint(tmp_path_factory.mktemp("probface") / "probface.pt", state)


def minus_mean_sigma2(ckpt: Path, images: np.ndarray) -> np.ndarray:
    """-(mean over dimensions of sigma^2) of uint8 RGB faces (N, 3, H, W), straight from the checkpoint."""
    from probface.embedder import load_probface

    _, sigma2 = load_probface(ckpt)(torch.from_numpy(images))
    return -sigma2.double().mean(1).numpy()


def test_sigma2_quality_is_minus_the_mean_variance_of_the_probface_checkpoint(
    small_lfw, probface_ckpt, tmp_path
):
    from data.verification import load_bin

    ckpt = str(probface_ckpt)
    argv = ["--model", ckpt, "--bin", str(small_lfw["root"] / "lfw.bin"), "--quality", "sigma2", "norm",
            "--probface", ckpt, "--fusion", "none", "--fmr", "0.1", "--dump", str(tmp_path / "d.npz"),
            "--device", "cpu"]  # fmt: skip
    assert hq_quality.main(argv) == 0
    expected = minus_mean_sigma2(probface_ckpt, load_bin(small_lfw["root"] / "lfw.bin").images)
    with np.load(tmp_path / "d.npz") as dump:
        np.testing.assert_allclose(dump["image_sigma2"], expected, rtol=1e-5)
        assert np.ptp(dump["image_sigma2"]) > 0
        np.testing.assert_allclose(dump["pair_sigma2"], np.minimum(expected[0::2], expected[1::2]), rtol=1e-5)


# --------------------------------------------------------------------------------------------- IJB


def test_template_quality_is_the_mean_of_its_image_rows():
    templates = np.array([7, 3, 7, 3, 3, 9])
    q = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 5.0])
    np.testing.assert_allclose(
        ijb_quality.template_quality(q, templates, np.array([3, 7, 9])), [4.0, 2.0, 5.0]
    )


def write_ijb(folder: Path) -> Path:
    """An IJB-C meta tree of 8 images in 4 templates (2 subjects), 4 template pairs; no photos needed when
    the features come from a file."""
    meta = folder / "IJBC" / "meta"
    meta.mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(1, 9)]
    faceness = [0.9, 0.7, 0.95, 0.85, 0.6, 0.8, 0.99, 0.75]
    (meta / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{n} 38 52 74 52 56 72 42 92 71 92 {s}\n" for n, s in zip(names, faceness, strict=True))
    )
    tid_mid = [(1, 10), (1, 11), (2, 12), (2, 12), (3, 13), (3, 14), (4, 15), (4, 16)]
    (meta / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, (t, m) in zip(names, tid_mid, strict=True))
    )
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n3 4 1\n1 3 0\n2 4 0\n1 4 0\n")
    return folder


def test_ijb_command_scores_saved_features_with_template_qualities(tmp_path):
    root = write_ijb(tmp_path / "ijb")
    rng = np.random.default_rng(3)
    subject = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    centres = rng.normal(size=(2, 8))
    original = (centres[subject] + 0.6 * rng.normal(size=(8, 8))) * rng.uniform(5, 20, size=(8, 1))
    flipped = original + 0.1 * rng.normal(size=(8, 8))
    from validation_ijb.meta import load_ijb

    m = load_ijb(root, "ijbc", ("1:1",))
    features = tmp_path / "features.npz"
    np.savez(features, names=m.names, landmarks=m.landmarks, original=original.astype(np.float32),
             flipped=flipped.astype(np.float32))  # fmt: skip
    outputs = ["--json", str(tmp_path / "r.json"), "--dump", str(tmp_path / "d.npz")]
    argv = ["--model", str(features), "--data-root", str(root), "--quality", "norm", "detector"]
    assert ijb_quality.main([*argv, "--fmr", "0.34", "--mode", "N1D0F1", *outputs]) == 0
    norm = np.linalg.norm(original.astype(np.float32).astype(np.float64), axis=1)
    faceness = np.array([0.9, 0.7, 0.95, 0.85, 0.6, 0.8, 0.99, 0.75])
    fused = (original + flipped).astype(np.float32).astype(np.float64)
    tmpl = {1: fused[0] + fused[1], 2: fused[2:4].mean(0), 3: fused[4] + fused[5], 4: fused[6] + fused[7]}
    tmpl = {t: v / np.linalg.norm(v) for t, v in tmpl.items()}
    pairs = [(1, 2), (3, 4), (1, 3), (2, 4), (1, 4)]
    rows = {1: [0, 1], 2: [2, 3], 3: [4, 5], 4: [6, 7]}
    with np.load(tmp_path / "d.npz") as dump:
        np.testing.assert_allclose(dump["scores"], [tmpl[a] @ tmpl[b] for a, b in pairs], rtol=1e-5)
        for name, image_q in (("norm", norm), ("detector", faceness)):
            expected = [min(image_q[rows[a]].mean(), image_q[rows[b]].mean()) for a, b in pairs]
            np.testing.assert_allclose(dump[f"pair_{name}"], expected, rtol=1e-6)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"]["mode"] == "N1D0F1" and saved["templates"] == 4
    r = saved["edc"]["0.34"]  # 3 impostor pairs: floor(0.34 * 3) = 1 may be above the threshold
    scores = np.array([tmpl[a] @ tmpl[b] for a, b in pairs])
    t, above = direct_threshold(scores[2:], 0.34)
    assert r["threshold"] == pytest.approx(t, rel=1e-6) and r["false_matches"] == above
    assert r["fnmr"] == np.mean(scores[:2] <= t)


def test_ijb_sigma2_quality_from_the_aligned_photos(small_lfw, probface_ckpt, tmp_path):
    import shutil

    from validation_ijb.dataset import AlignedFaces
    from validation_ijb.meta import load_ijb

    root = write_ijb(tmp_path / "ijb")
    crops = root / "IJBC" / "loose_crop"
    crops.mkdir()
    photos = hq_quality.pair_photos(small_lfw["root"] / "pairs.txt", small_lfw["photos"])[0][:8]
    for i, photo in enumerate(photos, 1):
        shutil.copyfile(photo, crops / f"{i}.jpg")
    m = load_ijb(root, "ijbc", ("1:1",))
    rng = np.random.default_rng(4)
    features = tmp_path / "features.npz"
    original, flipped = rng.normal(size=(2, 8, 8)).astype(np.float32)
    np.savez(features, names=m.names, landmarks=m.landmarks, original=original, flipped=flipped)
    argv = ["--model", str(features), "--data-root", str(root), "--quality", "sigma2", "--fmr", "0.34"]
    argv += [
        "--probface",
        str(probface_ckpt),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--dump",
        str(tmp_path / "d.npz"),
    ]
    assert ijb_quality.main(argv) == 0
    faces = AlignedFaces(m.image_paths, m.landmarks)
    expected = minus_mean_sigma2(probface_ckpt, np.stack([faces[i] for i in range(8)]))
    templates = {1: [0, 1], 2: [2, 3], 3: [4, 5], 4: [6, 7]}
    pairs = [(1, 2), (3, 4), (1, 3), (2, 4), (1, 4)]
    with np.load(tmp_path / "d.npz") as dump:
        np.testing.assert_allclose(dump["image_sigma2"], expected, rtol=1e-5)
        pair_q = [min(expected[templates[a]].mean(), expected[templates[b]].mean()) for a, b in pairs]
        np.testing.assert_allclose(dump["pair_sigma2"], pair_q, rtol=1e-5)
