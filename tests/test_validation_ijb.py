"""IJB-B/C evaluator: meta readers, alignment, N/D/F switches, media pooling, 1:1 and 1:N metrics (against
direct re-implementations and hand-computed answers), open-set identification, cache, CLI and script.

The end-to-end tests run on a tiny IJB_release-style tree built from real LFW photos with landmarks from
the framework's YuNet detector (``validation_ijb.lfw_ijb``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as sklearn_roc_curve

from evaluation.identification import open_set_tpir_at_fpir, tpir_at_fpir
from face_alignment import align_face
from validation_ijb import evaluate, lfw_ijb
from validation_ijb.dataset import AlignedFaces
from validation_ijb.meta import IJBMeta, IJBMetaError, TemplateList, load_ijb
from validation_ijb.protocol import (
    Mode,
    identification,
    image_features,
    pair_scores,
    template_features,
)

ALL_MODES = [Mode(bool(n), bool(d), bool(f)) for n in (1, 0) for d in (1, 0) for f in (1, 0)]
PROJECT = Path(evaluate.__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ direct versions


def direct_templates(feats, templates, medias, weights=None):
    """Media pooling written as the protocol says: average per media, sum the media, normalise."""
    out = {}
    for t in sorted(set(templates.tolist())):
        by_media: dict[int, list[np.ndarray]] = {}
        for k in np.flatnonzero(templates == t):
            w = 1.0 if weights is None else weights[k]
            by_media.setdefault(int(medias[k]), []).append(w * feats[k].astype(np.float64))
        total = sum(np.mean(v, axis=0) for v in by_media.values())
        out[t] = total / np.linalg.norm(total)
    return out


def insightface_tar(scores, labels, fars):
    fpr, tpr, _ = sklearn_roc_curve(labels, scores)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {far: tpr[np.argmin(np.abs(fpr - far))] for far in fars}


def direct_rank(probe, pid, gallery, gids):
    scores = gallery @ probe
    mate = scores[gids == pid].max()
    return 1 + int((scores[gids != pid] > mate).sum()), mate


# ---------------------------------------------------------------------- evaluation.identification


def test_tpir_at_fpir_equals_brute_force_in_any_chunking():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 8))
    gallery_ids = np.arange(30)
    gallery = centres + rng.normal(scale=0.5, size=(30, 8))
    probe_ids = rng.integers(0, 30, 200)
    probes = centres[probe_ids] + rng.normal(scale=1.0, size=(200, 8))
    scores = probes @ gallery.T
    mate = scores[np.arange(200), probe_ids]
    non_mate = np.sort(scores[probe_ids[:, None] != gallery_ids[None, :]])[::-1]
    for chunk in (7, 4096):
        got = tpir_at_fpir(probes, probe_ids, gallery, gallery_ids, (0.01, 0.07, 0.1), chunk=chunk)
        for fpir, k in ((0.01, 2), (0.07, 14), (0.1, 20)):  # k = ceil(200 x FPIR), 200 x 0.07 = 14 exactly
            threshold = non_mate[k - 1]
            assert got[fpir]["threshold"] == pytest.approx(threshold, abs=1e-5)
            assert got[fpir]["tpir"] == np.mean(mate > threshold)
    assert 0.05 < got[0.01]["tpir"] < got[0.1]["tpir"] < 1  # neither trivial nor saturated


def test_open_set_tpir_equals_brute_force():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 8))
    gallery_ids = np.arange(20)  # identities 20..39 have no gallery entry
    gallery = centres[:20] + rng.normal(scale=0.5, size=(20, 8))
    probe_ids = rng.integers(0, 40, 300)
    probes = centres[probe_ids] + rng.normal(scale=1.0, size=(300, 8))
    mated = probe_ids < 20
    top1 = np.sort((probes[~mated] @ gallery.T).max(axis=1))[::-1]
    got = open_set_tpir_at_fpir(probes, probe_ids, gallery, gallery_ids, (0.01, 0.1), chunk=11)
    for fpir in (0.01, 0.1):
        threshold = top1[math.ceil(len(top1) * fpir) - 1]
        hits = []
        for p, pid in zip(probes[mated], probe_ids[mated], strict=True):
            rank, mate = direct_rank(p, pid, gallery, gallery_ids)
            hits.append(rank == 1 and mate > threshold)
        assert got[fpir]["threshold"] == pytest.approx(threshold, abs=1e-5)
        assert got[fpir]["tpir"] == np.mean(hits)
    assert 0 < got[0.01]["tpir"] < got[0.1]["tpir"] < 1
    with pytest.raises(ValueError, match="mated and non-mated"):
        open_set_tpir_at_fpir(probes[mated], probe_ids[mated], gallery, gallery_ids)
    with pytest.raises(ValueError, match="no gallery mate"):
        tpir_at_fpir(probes, probe_ids, gallery, gallery_ids)


# ------------------------------------------------------------------------------------- protocol parts


def test_image_features_switches_closed_form():
    rng = np.random.default_rng(2)
    o, f = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    face = rng.uniform(0.1, 1, 5).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = {
        "N1D0F0": o, "N1D0F1": o + f, "N0D0F1": unit(o + f), "N0D0F0": unit(o),
        "N1D1F1": (o + f) * face[:, None], "N0D1F1": unit(o + f) * face[:, None],
        "N1D1F0": o * face[:, None], "N0D1F0": unit(o) * face[:, None],
    }  # fmt: skip
    for mode in ALL_MODES:
        np.testing.assert_allclose(image_features(o, f, face, mode), expected[mode.name], rtol=1e-6)
    assert Mode.parse("n0d1f1") == Mode(False, True, True) and Mode().name == "N1D1F1"
    with pytest.raises(ValueError, match=r"N<0\|1>D"):
        Mode.parse("N2D1F1")
    with pytest.raises(ValueError, match="flipped images"):
        image_features(o, None, face, Mode())


def test_template_pooling_against_direct_computation():
    rng = np.random.default_rng(3)
    # template 7: media 1 (3 frames) + media 2 (1 photo); template 3: one photo; template 5: media 4 x2,
    # media 9, and media 1 again (media ids only group within a template)
    templates = np.array([7, 7, 7, 3, 7, 5, 5, 5, 5])
    medias = np.array([1, 1, 1, 8, 2, 4, 4, 9, 1])
    feats = rng.normal(size=(9, 6)).astype(np.float32)
    weights = rng.uniform(0.1, 2.0, 9)
    for w in (None, weights):
        ids, pooled = template_features(feats, templates, medias, w)
        direct = direct_templates(feats, templates, medias, w)
        assert ids.tolist() == [3, 5, 7]
        for row, t in enumerate(ids):
            np.testing.assert_allclose(pooled[row], direct[t], rtol=1e-5, atol=1e-6)
    # by hand for template 7: mean of the three frames + the photo
    t7 = feats[:3].mean(0) + feats[4]
    np.testing.assert_allclose(
        template_features(feats, templates, medias)[1][2], t7 / np.linalg.norm(t7), 1e-5
    )
    with pytest.raises(ValueError, match="zero or undefined"):
        template_features(feats, templates, medias, np.where(templates == 3, 0.0, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        template_features(feats, templates, medias, -weights)
    with pytest.raises(ValueError, match="template 42 has no images"):
        pair_scores(ids, pooled, np.array([3, 42]), np.array([5, 7]))


def test_pair_scores_in_blocks_equal_direct_dot_products():
    rng = np.random.default_rng(7)
    ids = np.array([2, 3, 5, 8, 13, 21, 34])
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    t1, t2 = rng.choice(ids, 40), rng.choice(ids, 40)
    direct = [feats[ids == a][0] @ feats[ids == b][0] for a, b in zip(t1, t2, strict=True)]
    for block in (1, 3, 2048):
        np.testing.assert_allclose(pair_scores(ids, feats, t1, t2, block=block), direct, rtol=1e-5, atol=1e-6)


TIE_A, TIE_B = (3.0, 4.0, 0.0), (3.0, 4.0, 1e-4)  # cosines with e0: 0.6 and 0.6 - 1.2e-10


def toward_e0(cosine: float) -> tuple[float, float, float]:
    return cosine, math.sqrt(1 - cosine * cosine), 0.0


def e0_templates(probes: list[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image features (float32, one image and media per template) of template 1 along e0 and of templates
    100, 101, ... given as 3-vectors; their ids and media ids. TIE_A and TIE_B score 0.6 and 0.6 - 1.2e-10
    against e0: one value once rounded to float32, two in float64."""
    feats = np.array([(2.0, 0.0, 0.0), *probes], np.float32)
    templates = np.r_[1, np.arange(100, 100 + len(probes))]
    return feats, templates, np.arange(len(feats))


def test_tar_at_far_equals_insightface_where_float32_rounding_ties_scores():
    """insightface pools and scores templates in float64; float32 scores tie two impostors here, and the
    thinned ROC then keeps a point at FPR 0.1 exactly (TAR 1/2) where the float64 ROC has its nearest point
    at 0.16 (TAR 1). The evaluator must give the float64 answer at every FAR."""
    above = [toward_e0(0.9), toward_e0(0.85), toward_e0(0.8), TIE_A, TIE_B,
             toward_e0(0.55), toward_e0(0.5), toward_e0(0.45)]  # fmt: skip  # 8 of 50 impostors
    below = [toward_e0(c) for c in np.linspace(0.25, -0.9, 42)]
    feats, templates, medias = e0_templates([toward_e0(0.95), *above, toward_e0(0.3), *below])
    labels = np.array([1] + [0] * 8 + [1] + [0] * 42)
    n = len(feats)
    meta = IJBMeta("ijbc", Path("."), np.array([f"{k}.jpg" for k in range(n)]), np.zeros((n, 5, 2)),
                   np.ones(n, np.float32), templates, medias,
                   pairs=(np.ones(n - 1, np.int64), templates[1:], labels))  # fmt: skip
    unit = feats.astype(np.float64) / np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True)
    reference = unit[1:] @ unit[0]  # insightface: float64 templates, float64 cosines
    impostors = reference[labels == 0]
    assert len(np.unique(impostors)) == 50 and len(np.unique(impostors.astype(np.float32))) == 49
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    expected = insightface_tar(reference, labels, fars)
    assert expected[1e-1] == 1.0 and insightface_tar(reference.astype(np.float32), labels, fars)[1e-1] == 0.5
    got = evaluate.evaluate_features(meta, feats, None, [Mode(True, False, False)])["N1D0F0"]["1:1"]
    assert got["tar_at_far"] == expected
    fpr, tpr, _ = sklearn_roc_curve(labels, reference)
    np.testing.assert_allclose(got["fpr"], fpr, rtol=1e-12)
    np.testing.assert_allclose(got["tpr"], tpr, rtol=1e-12)


def test_1n_scores_in_float64_where_float32_rounding_ties_a_mate():
    """insightface's 1:N script ranks and thresholds float64 similarities. Against a probe along e0, a
    non-mate 1.2e-10 above the mate ranks first (a float32 tie would give rank 1), and a mate 1.2e-10
    above the best non-mate clears the TPIR threshold (a float32 tie would not)."""
    feats, templates, medias = e0_templates([TIE_A, TIE_B, toward_e0(0.2)])
    ids, pooled = template_features(feats, templates, medias)
    probes = TemplateList(Path("probe.csv"), np.array([1]), np.array([7]))
    for mate, expected_rank, expected_tpir in ((101, 2, 0.0), (100, 1, 1.0)):
        other = 201 - mate  # the other of templates 100 and 101
        gallery = TemplateList(Path("G1.csv"), np.array([mate, other, 102]), np.array([7, 8, 9]))
        found = identification(ids, pooled, {"G1": gallery}, probes, ranks=(1, 2), fpirs=(1.0,))
        assert found["rank"] == {1: float(expected_rank == 1), 2: 1.0}
        assert found["tpir_at_fpir"][1.0]["tpir"] == expected_tpir


# ----------------------------------------------------------------------------------- bad meta files


def write_meta(folder: Path, **replace: str) -> Path:
    """A minimal valid IJB-C meta folder (4 images, 3 templates); ``replace`` swaps whole files."""
    files = {
        "ijbc_name_5pts_score.txt": "".join(
            f"{k}.jpg 38 52 74 52 56 72 42 92 71 92 0.9{k}\n" for k in range(1, 5)
        ),
        "ijbc_face_tid_mid.txt": "1.jpg 10 100\n2.jpg 10 100\n3.jpg 11 101\n4.jpg 12 102\n",
        "ijbc_template_pair_label.txt": "10 11 1\n10 12 0\n11 12 0\n",
        "ijbc_1N_gallery_G1.csv": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n10,1,img/1.jpg\n10,1,img/2.jpg\n",
        "ijbc_1N_gallery_G2.csv": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n12,2,img/4.jpg\n",
        "ijbc_1N_probe_mixed.csv": "TEMPLATE_ID,SUBJECT_ID,FILENAME\n11,1,img/3.jpg\n",
    }
    files.update({name.replace("__", "."): text for name, text in replace.items()})
    meta = folder / "IJBC" / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (meta / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("ijbc_name_5pts_score__txt", "1.jpg 1 2 3\n", r"ijbc_name_5pts_score.txt:1: 4 fields, expected 12"),
        ("ijbc_name_5pts_score__txt", "1.jpg 38 52 74 52 56 72 42 92 71 92 0.9\n\n2.jpg 38 52 74 52 56 "
         "x 42 92 71 92 0.9\n", r"ijbc_name_5pts_score.txt:3: landmark coordinate 'x' is not a finite"),
        ("ijbc_name_5pts_score__txt", "1.jpg 38 52 74 52 56 72 42 92 71 92 nan\n", r"faceness score 'nan'"),
        ("ijbc_face_tid_mid__txt", "1.jpg 10 100\n2.jpg ten 100\n", r"ijbc_face_tid_mid.txt:2: template id"),
        ("ijbc_face_tid_mid__txt", "1.jpg 10 100\n3.jpg 10 100\n2.jpg 11 101\n4.jpg 12 102\n",
         r"ijbc_face_tid_mid.txt: image 2 is '3.jpg', but image 2 of ijbc_name_5pts_score.txt is '2.jpg'"),
        ("ijbc_template_pair_label__txt", "10 11 1\n10 12 x\n", r"ijbc_template_pair_label.txt:2: label 'x'"),
        ("ijbc_template_pair_label__txt", "10 11 1\n\n10 12 2\n", r"ijbc_template_pair_label.txt:3: label 2"),
        ("ijbc_template_pair_label__txt", "10 11 1 5\n", r"ijbc_template_pair_label.txt:1: 4 fields"),
        ("ijbc_template_pair_label__txt", "10 11 1\n10 99 0\n", r"template_pair_label.txt: 1 entries .* 99"),
        ("ijbc_1N_gallery_G1__csv", "10,1,img/1.jpg\n", r"G1.csv:1: header .* lacks TEMPLATE_ID"),
        ("ijbc_1N_gallery_G1__csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME\n10,1,a\n10,3,b\n",
         r"ijbc_1N_gallery_G1.csv:3: template 10 has subject 3, but 1 at line 2"),
        ("ijbc_1N_probe_mixed__csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME\n11,1\n", r"mixed.csv:2: 2 columns"),
        ("ijbc_1N_probe_mixed__csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME\n11,x,a\n", r"mixed.csv:2: SUBJECT_ID"),
    ],
)  # fmt: skip
def test_bad_meta_lines_name_file_and_line(tmp_path, file, text, message):
    root = write_meta(tmp_path, **{file: text})
    with pytest.raises(IJBMetaError, match=message):
        load_ijb(root, "ijbc")


def test_meta_reader_on_valid_files_and_missing_ones(tmp_path):
    meta = load_ijb(write_meta(tmp_path), "ijbc")
    assert meta.names.tolist() == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert meta.landmarks.shape == (4, 5, 2) and meta.landmarks[0, 1].tolist() == [74, 52]
    np.testing.assert_allclose(meta.faceness, [0.91, 0.92, 0.93, 0.94], rtol=1e-6)
    assert meta.templates.tolist() == [10, 10, 11, 12] and meta.medias.tolist() == [100, 100, 101, 102]
    assert [a.tolist() for a in meta.pairs] == [[10, 10, 11], [11, 12, 12], [1, 0, 0]]
    assert meta.galleries["G1"].templates.tolist() == [10] and meta.probes.subjects.tolist() == [1]
    assert meta.image_paths[0] == tmp_path / "IJBC" / "loose_crop" / "1.jpg"
    assert load_ijb(tmp_path / "IJBC", "ijbc", ("1:1",)).probes is None  # root may be the IJBC folder
    assert meta.skipped == {}
    (tmp_path / "IJBC" / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(IJBMetaError, match=r"ijbc_1N_gallery_G2.csv: 1:N list not found"):
        load_ijb(tmp_path, "ijbc", ("1:1", "1:N"))  # asked for by name: an error
    with pytest.raises(IJBMetaError, match=r"no IJB meta found .*/ijbb_face_tid_mid.txt"):
        load_ijb(tmp_path, "ijbb")


def test_protocols_without_their_files_are_skipped_unless_asked_for(tmp_path, capsys):
    """insightface's 1:1 script needs no 1:N list: by default each protocol whose files are present runs and
    each other one is named with its missing file; a protocol asked for by name must have its files."""
    root = write_meta(tmp_path)
    meta_dir = root / "IJBC" / "meta"
    full = load_ijb(root, "ijbc")
    rng = np.random.default_rng(8)
    features = tmp_path / "features.npz"
    evaluate.save_features(features, full, *rng.normal(size=(2, 4, 8)).astype(np.float32))
    (meta_dir / "ijbc_1N_gallery_G1.csv").unlink()
    (meta_dir / "ijbc_1N_probe_mixed.csv").unlink()
    meta = load_ijb(root, "ijbc")
    assert meta.pairs is not None and meta.probes is None and meta.galleries == {}
    assert meta.skipped == {"1:N": meta_dir / "ijbc_1N_gallery_G1.csv"}
    argv = ["--model", str(features), "--ijb-root", str(root), "--dataset", "ijbc",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [
        f"evaluate: skipping 1:N: {meta_dir / 'ijbc_1N_gallery_G1.csv'} not found"
    ]
    assert "1:1 verification" in printed.out and "1:N" not in printed.out
    results = json.loads((tmp_path / "o" / "ijbc_features.json").read_text())
    assert set(results["modes"]["N1D1F1"]) == {"switches", "1:1"} and "1:N" in results["skipped"]
    assert evaluate.main([*argv, "--protocols", "1:1", "1:N"]) == 2
    assert "ijbc_1N_gallery_G1.csv: 1:N list not found" in capsys.readouterr().err
    # the other way round: 1:N files only
    (meta_dir / "ijbc_template_pair_label.txt").rename(tmp_path / "pairs.txt")
    with pytest.raises(
        IJBMetaError, match=r"no protocol to run; .*pair_label.txt and .*gallery_G1.csv not found"
    ):
        load_ijb(root, "ijbc")
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_probe_mixed.csv"):
        write_meta(tmp_path / "again")
        (tmp_path / "again" / "IJBC" / "meta" / name).rename(meta_dir / name)
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr()
    assert "skipping 1:1: " in printed.err and "ijbc_template_pair_label.txt not found" in printed.err
    assert "1:N identification" in printed.out and "1:1 verification" not in printed.out


# --------------------------------------------------------------------------- the tiny LFW-based tree


@pytest.fixture(scope="module")
def tree(shared_data, tmp_path_factory):
    return lfw_ijb.build(tmp_path_factory.mktemp("ijb"), shared_data / "lfw_color150", identities=12)


@pytest.fixture(scope="module")
def meta(tree):
    return load_ijb(tree.root, "ijbc")


@pytest.fixture(scope="module")
def crops(meta):
    faces = AlignedFaces(meta.image_paths, meta.landmarks)
    return np.stack([faces[i] for i in range(len(faces))])


def crop_key(crop) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(crop).tobytes()).digest()


class TableEmbedder:
    """Features looked up by the bytes of each aligned crop; an unknown crop is an error."""

    def __init__(self, table: dict[bytes, np.ndarray]):
        self.table, self.calls = table, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.from_numpy(np.stack([self.table[crop_key(img.numpy())] for img in batch]))


def table_embedder(tree, crops, feature_of):
    """``feature_of(row, flipped)`` -> feature; rows copying one photo share it (their crops are equal)."""
    table = {}
    for k, row in enumerate(tree.rows):
        for flipped, crop in ((False, crops[k]), (True, crops[k][:, :, ::-1])):
            if crop_key(crop) not in table:
                table[crop_key(crop)] = feature_of(row, flipped).astype(np.float32)
    return TableEmbedder(table)


def test_tree_is_laid_out_like_ijb_release(tree, meta):
    assert len(tree.people) == 12 and len(meta.names) == len(tree.rows) == 12 * 4 + 6
    assert len(np.unique(meta.templates)) == 24 and len(meta.pairs[0]) == 12 * 12
    assert meta.pairs[2].sum() == 12 and len(meta.galleries["G1"].templates) == 6
    assert len(meta.probes.templates) == 12 and all(p.is_file() for p in meta.image_paths)
    # some templates pool two images of one media id, some have three media
    per_template = {t: meta.medias[meta.templates == t] for t in np.unique(meta.templates)}
    assert any(len(m) == 2 and len(set(m)) == 1 for m in per_template.values())
    assert any(len(set(m)) == 3 for m in per_template.values())
    assert meta.faceness.min() > 0.5 and meta.faceness.max() <= 1


def test_alignment_is_the_framework_template_with_black_border(tree, meta, crops):
    assert crops.shape == (len(meta.names), 3, 112, 112) and crops.dtype == np.uint8
    for k in (0, 5, 50):
        rgb = cv2.cvtColor(cv2.imread(str(meta.image_paths[k])), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(crops[k], align_face(rgb, meta.landmarks[k]).transpose(2, 0, 1))
    corner = meta.landmarks[0] - meta.landmarks[0].min(axis=0)  # the face pushed into the photo's corner
    crop = AlignedFaces(meta.image_paths[:1], corner[None])[0]
    assert (crop[:, :10, :10] == 0).all() and crop[:, 60:, 60:].mean() > 20


def test_hand_computed_results_with_broken_templates(tree, meta, crops):
    """Identity i has direction e_i; the probe photos of 3 'broken' identities point to -e_i. Genuine pairs
    of the other 9 score ~1, impostors ~0, broken genuine pairs ~-1, so TAR = 9/12 at every FAR,
    rank-1/5/10 = 9/12 (a broken probe's mate ranks 12th), TPIR = 9/12, and per gallery (G1 even, G2 odd
    identities) 5/6 and 4/6."""
    broken = {1, 4, 9}
    rng = np.random.default_rng(4)
    scale = {p: rng.uniform(1, 5) for p in {r.photo for r in tree.rows}}
    noise = {(p, f): rng.normal(scale=0.01, size=16) for p in scale for f in (False, True)}

    def feature_of(row, flipped):
        sign = -1.0 if row.identity in broken and row.template >= 2000 else 1.0
        return scale[row.photo] * (sign * np.eye(16)[row.identity] + noise[row.photo, flipped])

    results = evaluate.evaluate_features(meta, *evaluate.extract_features(
        table_embedder(tree, crops, feature_of), meta, batch_size=16, workers=0), ALL_MODES)  # fmt: skip
    for mode in ALL_MODES:
        r = results[mode.name]
        assert r["1:1"]["tar_at_far"] == {far: 9 / 12 for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
        assert r["1:N"]["rank"] == {1: 9 / 12, 5: 9 / 12, 10: 9 / 12}
        assert {f: v["tpir"] for f, v in r["1:N"]["tpir_at_fpir"].items()} == {0.01: 9 / 12, 0.1: 9 / 12}
        g1, g2 = r["1:N"]["open_set"]["G1"], r["1:N"]["open_set"]["G2"]
        assert (g1["mated"], g1["non_mated"]) == (6, 6)
        assert g1["tpir_at_fpir"][0.01]["tpir"] == 5 / 6 and g2["tpir_at_fpir"][0.1]["tpir"] == 4 / 6


def test_every_mode_equals_a_direct_computation(tree, meta, crops):
    """Random identity centres, noisy and unequally scaled image features, random faceness: the evaluator's
    ROC, TAR, ranks and TPIR equal a direct loop implementation in all 8 N/D/F modes, and each switch
    changes the scores."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(12, 16))
    feats = {(r.photo, f): rng.uniform(0.3, 3) * (centres[r.identity] + rng.normal(scale=2.5, size=16))
             for r in tree.rows for f in (False, True)}  # fmt: skip
    original, flipped = evaluate.extract_features(
        table_embedder(tree, crops, lambda row, f: feats[row.photo, f]), meta, batch_size=32, workers=0
    )
    meta_d = load_ijb(tree.root, "ijbc")
    meta_d.faceness = rng.uniform(0.1, 1.0, len(meta_d.names)).astype(np.float32)
    results = evaluate.evaluate_features(meta_d, original, flipped, ALL_MODES)
    t1, t2, labels = meta_d.pairs
    galleries = {n: dict(zip(g.templates.tolist(), g.subjects.tolist(), strict=True))
                 for n, g in meta_d.galleries.items()}  # fmt: skip
    union = galleries["G1"] | galleries["G2"]
    g_ids = np.array(list(union.values()))
    scores_by_mode = {}
    for mode in ALL_MODES:
        img = []
        for k in range(len(meta_d.names)):
            x = original[k].astype(np.float64) + (flipped[k] if mode.flip else 0)
            x = x if mode.norm_score else x / np.linalg.norm(x)
            img.append(x * meta_d.faceness[k] if mode.detector_score else x)
        tmpl = direct_templates(np.array(img), meta_d.templates, meta_d.medias)
        scores = np.array([tmpl[a] @ tmpl[b] for a, b in zip(t1, t2, strict=True)])
        scores_by_mode[mode.name] = scores
        got = results[mode.name]
        fpr, tpr, _ = sklearn_roc_curve(labels, scores)
        np.testing.assert_allclose(got["1:1"]["fpr"], fpr)
        np.testing.assert_allclose(got["1:1"]["tpr"], tpr)
        assert got["1:1"]["tar_at_far"] == pytest.approx(
            insightface_tar(scores, labels, got["1:1"]["tar_at_far"])
        )
        gallery = np.array([tmpl[t] for t in union])
        probes = [(tmpl[t], s) for t, s in zip(meta_d.probes.templates, meta_d.probes.subjects, strict=True)]
        ranks, mates, non_mates = [], [], []
        for p, s in probes:
            rank, mate = direct_rank(p, s, gallery, g_ids)
            ranks.append(rank)
            mates.append(mate)
            non_mates += (gallery[g_ids != s] @ p).tolist()
        assert got["1:N"]["rank"] == {k: np.mean(np.array(ranks) <= k) for k in (1, 5, 10)}
        non_mates = np.sort(non_mates)[::-1]
        for fpir in (0.01, 0.1):
            threshold = non_mates[math.ceil(12 * fpir) - 1]
            assert got["1:N"]["tpir_at_fpir"][fpir]["tpir"] == np.mean(np.array(mates) > threshold)
    assert 0.3 < results["N1D1F1"]["1:N"]["rank"][1] < 1  # a case with hits and misses
    assert 0.2 < results["N1D1F1"]["1:1"]["tar_at_far"][1e-2] < 1
    for a, b in (("N1D1F1", "N0D1F1"), ("N1D1F1", "N1D0F1"), ("N1D1F1", "N1D1F0")):
        assert np.abs(scores_by_mode[a] - scores_by_mode[b]).max() > 1e-2, (a, b)


def test_features_do_not_depend_on_batch_size_or_workers(tree, meta, crops):
    rng = np.random.default_rng(6)
    embed = table_embedder(tree, crops, lambda row, f: rng.normal(size=8))
    first = evaluate.extract_features(embed, meta, batch_size=3, workers=0)
    for batch_size, workers in ((7, 0), (64, 2)):
        again = evaluate.extract_features(embed, meta, batch_size=batch_size, workers=workers)
        np.testing.assert_array_equal(again[0], first[0])
        np.testing.assert_array_equal(again[1], first[1])


# ----------------------------------------------------------------------------------- real model, CLI


def test_cli_with_pretrained_mobilefacenet(shared_data, tmp_path, capsys):
    # a smaller tree than the module's (6 people, 27 faces): the model is the slow part on 2 CPU cores
    tree = lfw_ijb.build(tmp_path / "ijb", shared_data / "lfw_color150", identities=6)
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--model", str(model), "--color", "bgr", "--ijb-root", str(tree.root), "--dataset", "ijbc",
            "--norm-score", "1", "0", "--workers", "0", "--batch-size", "64", "--out", str(out),
            "--cache", str(cache), "--device", "cpu"]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mode    norm det flip" in printed and "BGR input" in printed
    assert [line.split()[:4] for line in printed.splitlines() if line.startswith("N")][:2] == [
        ["N1D1F1", "1", "1", "1"], ["N0D1F1", "0", "1", "1"]]  # fmt: skip
    results = json.loads((out / "ijbc_mobilefacenet_paddle_128d.json").read_text())
    assert set(results["modes"]) == {"N1D1F1", "N0D1F1"} and results["settings"]["color"] == "bgr"
    assert results["settings"]["normalization"] == "(x/255 - 0.5) / 0.5"  # the model's own, as it was fed
    for mode in results["modes"].values():  # a strong model on LFW people: near perfect
        assert mode["1:1"]["tar_at_far"]["0.1"] >= 0.8
        assert mode["1:N"]["rank"]["1"] >= 0.8 and mode["1:N"]["tpir_at_fpir"]["0.1"]["tpir"] >= 0.8
    assert (out / "ijbc_mobilefacenet_paddle_128d_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "N0D1F1" in (out / "ijbc_mobilefacenet_paddle_128d.txt").read_text()
    (features,) = cache.glob("ijbc__mobilefacenet_paddle_128d_*_bgr.npz")

    # re-scoring from the saved features: no model, other modes, same numbers for a repeated mode
    assert evaluate.main(["--model", str(features), "--ijb-root", str(tree.root), "--dataset", "ijbc",
                          "--modes", "N1D0F0", "N0D1F1", "--out", str(out)]) == 0  # fmt: skip
    again = json.loads((out / f"ijbc_{features.stem}.json").read_text())
    assert again["modes"]["N0D1F1"] == results["modes"]["N0D1F1"]
    assert again["modes"]["N1D0F0"]["switches"] == {"norm_score": 1, "detector_score": 0, "flip": 0}


def test_eval_script_passes_its_arguments(tmp_path):
    """OUT_DIR, a fourth argument that is not an option, wins over $OUT, which wins over
    work_dirs/eval/<model>_<dataset> in the repository (python replaced by echo)."""
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "o"), "CACHE": str(tmp_path / "c")}
    script = ["bash", str(PROJECT / "validation_ijb/eval_ijb.sh")]
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    proc = subprocess.run([*script, "m.onnx", "/data/IJB_release", "ijbb", "--flip", "0"], **run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "-m", "validation_ijb.evaluate", "--model", "m.onnx", "--ijb-root", "/data/IJB_release",
        "--dataset", "ijbb", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--flip", "0",
    ]  # fmt: skip
    proc = subprocess.run([*script, "m.onnx", "root", "ijbb", "runs/ijbb", "--flip", "0"], **run)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset ijbb --out runs/ijbb --cache" in proc.stdout
    assert proc.stdout.split()[-2:] == ["--flip", "0"]
    del env["OUT"], env["CACHE"]
    printed = subprocess.run([*script, "ckpt/r50.pt", "root", "ijbc"], **run).stdout.split()
    out, cache = printed[printed.index("--out") + 1], printed[printed.index("--cache") + 1]
    assert Path(out).resolve() == PROJECT / "work_dirs/eval/r50_ijbc"
    assert Path(cache).resolve() == PROJECT / "work_dirs/eval/cache"
    usage = subprocess.run([*script, "m.onnx"], **run)
    assert usage.returncode == 2 and "CKPT_OR_ONNX IJB_ROOT ijbc|ijbb [OUT_DIR]" in usage.stderr


def test_cli_errors_are_clear(tree, tmp_path, capsys):
    bad = tmp_path / "features.npz"
    np.savez(bad, names=np.array(["x.jpg"]), landmarks=np.zeros((1, 5, 2)), original=np.zeros((1, 2)),
             flipped=np.zeros((1, 2)))  # fmt: skip
    argv = ["--model", str(bad), "--ijb-root", str(tree.root), "--dataset", "ijbc"]
    assert evaluate.main(argv) == 2
    assert "features of 1 other images" in capsys.readouterr().err
    assert evaluate.main([*argv[:2], "--ijb-root", str(tmp_path), "--dataset", "ijbb"]) == 2
    assert "no IJB meta found" in capsys.readouterr().err


def test_corrupt_image_is_named(tree, tmp_path):
    meta = load_ijb(tree.root, "ijbc", ("1:1",))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(meta.image_paths[0].read_bytes()[:300])
    with pytest.raises(ValueError, match=r"broken\.jpg: truncated JPEG"):
        AlignedFaces([broken], meta.landmarks[:1])[0]
