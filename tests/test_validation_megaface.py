"""MegaFace: rank-1 and TAR@FAR against direct computations, chunking, the noise lists, a real-face tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_validation_tinyface import KeyedEmbedder, keyed_features, one_torch_thread  # noqa: F401 (fixture)

from data.decode import DecodeError
from validation_megaface import evaluate
from validation_megaface.protocol import (
    FARS,
    NUM_BINS,
    MegaFaceLayoutError,
    _bins,
    list_facescrub,
    rank1_identification,
    read_facescrub_noises,
    read_megaface_noises,
    score_megaface,
    tar_at_fars,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path("models") / "onnx" / "mobilefacenet_paddle_128d.onnx"


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_case(seed=0, sizes=(1, 2, 3, 5, 8, 4), distractors=400, dim=12):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(ids)  # identities interleaved, as nothing promises they come grouped
    centres = rng.normal(size=(len(sizes), dim))
    probes = unit(centres[ids] + rng.normal(scale=0.9, size=(len(ids), dim)))
    return probes, ids, unit(rng.normal(size=(distractors, dim)))


def direct_rank1(probes, ids, distractors):
    """Every ordered same-identity pair (i, j), i != j, against i's best distractor, one by one."""
    successes = pairs = 0
    for i in range(len(probes)):
        best = max(float(probes[i] @ d) for d in distractors)
        for j in range(len(probes)):
            if i != j and ids[i] == ids[j]:
                pairs += 1
                successes += float(probes[i] @ probes[j]) > best
    return successes, pairs


def direct_scores(probes, ids, distractors):
    """(genuine, impostor) score lists: every probe against every other probe and every distractor."""
    genuine, impostor = [], []
    for i in range(len(probes)):
        for j in range(len(probes)):
            if i != j:
                (genuine if ids[i] == ids[j] else impostor).append(float(probes[i] @ probes[j]))
        impostor.extend((distractors @ probes[i]).tolist())
    return np.array(genuine), np.array(impostor)


EDGES = np.linspace(-1, 1, NUM_BINS + 1)


def assert_histogram_of(counts, scores, tol=1e-6):
    """``counts`` is the 10,000-bin histogram of ``scores`` up to float32 rounding: the totals agree, and
    so does the number of scores below every bin edge that no score lies within ``tol`` of."""
    scores = np.sort(np.asarray(scores, np.float64))
    assert counts.sum() == len(scores)
    inner = EDGES[1:-1]
    near = np.searchsorted(scores, inner + tol, "right") > np.searchsorted(scores, inner - tol, "left")
    assert near.sum() < 0.01 * len(inner)  # almost every edge is checked
    below = np.cumsum(counts)[:-1]
    np.testing.assert_array_equal(below[~near], np.searchsorted(scores, inner, "left")[~near])


def test_rank1_equals_the_direct_pairwise_computation():
    probes, ids, distractors = random_case()
    scores = score_megaface(probes, ids, distractors)
    accuracy, successes, pairs = rank1_identification(probes, ids, scores.max_distractor)
    expected = direct_rank1(probes, ids, distractors)
    assert (successes, pairs) == expected and pairs == 2 + 6 + 20 + 56 + 12
    assert 0 < successes < pairs  # the case has hits and misses
    assert accuracy == successes / pairs


def test_histograms_equal_direct_counts_and_do_not_depend_on_chunking():
    probes, ids, distractors = random_case(seed=1)
    genuine, impostor = direct_scores(probes.astype(np.float64), ids, distractors.astype(np.float64))
    blocks = [distractors[:5], distractors[5:123], distractors[123:]]
    for chunk, given in ((None, distractors), (3, blocks), (7, blocks), (64, blocks)):
        scores = score_megaface(probes, ids, given, chunk=chunk)
        assert_histogram_of(scores.genuine, genuine)
        assert_histogram_of(scores.impostor, impostor)
        np.testing.assert_allclose(scores.max_distractor, (probes @ distractors.T).max(1), rtol=1e-6)


def test_scores_outside_the_unit_range_land_in_the_end_bins():
    counts = _bins(torch.tensor([-1.0000001, -1.0, 0.0, 0.99995, 1.0, 1.0000002]), NUM_BINS)
    assert counts[0] == 2 and counts[NUM_BINS // 2] == 1 and counts[-1] == 3 and counts.sum() == 6


def snapped(values):
    """Scores moved to within a third of a bin of a bin centre, so a score's bin and its comparison with
    any bin edge agree whatever the rounding (the direct computation compares raw scores to edges)."""
    width = 2 / NUM_BINS
    k = np.clip(np.floor((values + 1) / width), 0, NUM_BINS - 1)
    rng = np.random.default_rng(7)
    return -1 + (k + 0.5 + rng.uniform(-0.3, 0.3, len(values))) * width


def direct_tar(genuine, impostor, target):
    """TAR at a FAR by counting raw scores at or above each bin edge, bracketing the target and
    interpolating between the two edges around it (0 if the edge above is 8x off or none is below)."""
    imp, gen = np.sort(impostor), np.sort(genuine)
    prev = None
    for edge in EDGES[:-1]:
        far = (len(imp) - np.searchsorted(imp, edge, "left")) / len(imp)
        tar = (len(gen) - np.searchsorted(gen, edge, "left")) / len(gen)
        if far == target:
            return tar
        if far < target:
            if prev[0] >= 8 * target:
                return 0.0
            return prev[1] + (target - prev[0]) / (far - prev[0]) * (tar - prev[1])
        prev = (far, tar)
    return 0.0


def test_tar_at_far_equals_a_direct_threshold_computation():
    rng = np.random.default_rng(3)
    genuine = snapped(np.clip(rng.normal(0.55, 0.15, 20_000), -1, 1))
    impostor = snapped(np.clip(rng.normal(0.0, 0.12, 400_000), -1, 1))
    ours = tar_at_fars(np.histogram(genuine, EDGES)[0], np.histogram(impostor, EDGES)[0], FARS)
    for far in FARS:
        assert ours[far] == pytest.approx(direct_tar(genuine, impostor, far), abs=1e-12), far
    assert 0 < ours[1e-4] < ours[1e-3] < ours[1e-2] < ours[1e-1] < 1
    assert ours[1e-9] == 0  # 400k impostors cannot resolve 1e-9


def test_tar_at_an_exactly_reached_far_is_the_direct_fraction():
    impostor = np.r_[np.linspace(-0.5, 0.3, 9990), np.full(10, 0.51)]  # FAR 1e-3 from 0.3 to 0.51
    genuine = np.linspace(0.2, 0.8, 601)
    hist = np.histogram(snapped(genuine), EDGES)[0], np.histogram(snapped(impostor), EDGES)[0]
    edge = EDGES[np.searchsorted(EDGES, 0.3 + 1e-9) + 1]  # the lowest edge above every low impostor
    assert tar_at_fars(*hist, [1e-3])[1e-3] == pytest.approx(np.mean(snapped(genuine) >= edge))
    # all impostors in one bin: FAR jumps from 1 to 0 there, far more than 8x any target
    one_bin = np.zeros(NUM_BINS, np.int64)
    one_bin[5000] = 100
    assert tar_at_fars(hist[0], one_bin, [1e-2])[1e-2] == 0.0
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        tar_at_fars(*hist, [1.5])


# ------------------------------------------------------------------------------------ a real-face tree


def build_testpack(shared_data: Path, root: Path) -> dict:
    """facescrub_images/<name>/<name>_<n>.png and megaface_images/<a>/<b>/<c>_<k>.jpg from CelebA crops,
    with noise lists in the insightface formats. Returns which files the lists remove."""
    celeba = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())
    probes_per_id = (3, 4, 2, 5, 3)
    for person, count in zip(celeba, probes_per_id, strict=False):
        name = f"Celeb_{person.name}"
        (root / "facescrub_images" / name).mkdir(parents=True)
        for n, photo in enumerate(sorted(person.glob("*.jpg"))[:count]):
            cv2.imwrite(str(root / "facescrub_images" / name / f"{name}_{n}.png"), cv2.imread(str(photo)))
    distractors = []
    for k, person in enumerate(celeba[5:12]):
        folder = root / "megaface_images" / f"{100 + k % 3}" / f"{person.name}@N0{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for n, photo in enumerate(sorted(person.glob("*.jpg"))[:3]):
            shutil.copy(photo, folder / f"{n}_{k}.jpg")
            distractors.append(folder / f"{n}_{k}.jpg")
    noisy_probe = f"Celeb_{celeba[1].name}_2.png"
    (root / "facescrub_noises.txt").write_text(
        f"#Please strictly follow the rules\n{noisy_probe}\nCeleb_0000_17.png\n"
    )
    noisy = ["/".join(distractors[1].parts[-3:]), "/".join(distractors[7].parts[-3:])]
    (root / "megaface_noises.txt").write_text(f"#comment\n{noisy[0]}\n0\t{noisy[1]}\n{noisy[0]}\n")
    return {"probe": noisy_probe, "distractors": noisy}


@pytest.fixture(scope="module")
def testpack(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("megaface_testpack")
    return root, build_testpack(shared_data, root)


@pytest.fixture(scope="module")
def keyed_pack(testpack):
    """A keyed embedder of the tree and the answer computed directly from its features."""
    root, noisy = testpack
    probe_files = sorted((root / "facescrub_images").rglob("*.png"))
    distractor_files = sorted((root / "megaface_images").rglob("*.jpg"))
    table, fused = keyed_features(
        [(p, p.parent.name) for p in probe_files] + [(p, None) for p in distractor_files], seed=2
    )
    keep_p = [p.name != noisy["probe"] for p in probe_files]
    keep_d = ["/".join(p.parts[-3:]) not in noisy["distractors"] for p in distractor_files]
    probes = fused[: len(probe_files)][keep_p]
    ids = np.array([p.parent.name for p in probe_files])[keep_p]
    distractors = fused[len(probe_files) :][keep_d]
    return table, probes, ids, distractors


def test_end_to_end_equals_the_direct_answer(testpack, keyed_pack, tmp_path):
    root, _ = testpack
    table, probes, ids, distractors = keyed_pack
    feats = evaluate.megaface_features(KeyedEmbedder(table), root, tmp_path, block_size=4, batch_size=5)
    # the kept images, embedded with their flips and fused, in listing order
    np.testing.assert_allclose(feats.probes, probes, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(feats.distractors), distractors, atol=1e-6)
    assert [feats.identities[i] for i in feats.ids] == ids.tolist()
    assert [len(b) for b in feats.distractors] == [4, 4, 4, 4, 3]  # 19 distractors in blocks of 4
    face, mega = feats.noises["facescrub"], feats.noises["megaface"]
    assert (face["listed"], face["removed"], face["not_found"]) == (2, 1, 1)
    assert face["not_found_examples"] == ["Celeb_0000_17.png"]
    assert (mega["listed"], mega["removed"], mega["not_found"]) == (2, 2, 0)
    # the protocol's numbers against direct computations on the expected features
    result = evaluate.megaface_results(feats, chunk=3)
    successes, pairs = direct_rank1(probes, ids, distractors)
    assert 0 < successes < pairs
    assert (result["identification_successes"], result["identification_pairs"]) == (successes, pairs)
    assert result["rank-1"] == successes / pairs
    genuine, impostor = direct_scores(probes.astype(np.float64), ids, distractors.astype(np.float64))
    assert (result["genuine_scores"], result["impostor_scores"]) == (len(genuine), len(impostor))
    assert (result["probes"], result["identities"], result["distractors"]) == (16, 5, 19)
    scores = score_megaface(feats.probes, feats.ids, feats.distractors)
    assert_histogram_of(scores.genuine, genuine)
    assert_histogram_of(scores.impostor, impostor)
    tars = tar_at_fars(scores.genuine, scores.impostor)
    assert result["tar_at_far"] == {f"{far:.0e}": tar for far, tar in tars.items()}
    assert result["tar@far=1e-06"] == result["tar_at_far"]["1e-06"]

    def no_model(images):
        raise AssertionError("stored features should have been used")

    again = evaluate.evaluate_megaface(no_model, root, tmp_path, block_size=4)
    assert {k: v for k, v in again.items() if k != "scoring_seconds"} == {
        k: v for k, v in result.items() if k != "scoring_seconds"
    }


def test_loader_workers_and_a_distractor_limit(testpack, keyed_pack, tmp_path):
    root, _ = testpack
    table = keyed_pack[0]
    full = evaluate.evaluate_megaface(KeyedEmbedder(table), root, tmp_path / "a", workers=2, block_size=8)
    alone = evaluate.evaluate_megaface(KeyedEmbedder(table), root, tmp_path / "b", block_size=100)
    assert full["rank-1"] == alone["rank-1"] and full["tar_at_far"] == alone["tar_at_far"]
    limited = evaluate.evaluate_megaface(KeyedEmbedder(table), root, tmp_path / "b", limit_distractors=6)
    assert limited["distractors"] == 6 and limited["rank-1"] >= full["rank-1"]


def test_command_with_a_real_model(shared_data, testpack, tmp_path, capsys):
    root, _ = testpack
    out = tmp_path / "r.json"
    args = ["--root", str(root), "--model", str(shared_data / MODEL), "--color", "bgr", "--workers", "0",
            "--features", str(tmp_path / "f"), "--json", str(out), "--limit-distractors", "5"]  # fmt: skip
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    assert "16 probes of 5 identities (1 noisy removed), 5 distractors (2 noisy removed)" in printed
    assert "TAR@1e-06" in printed
    saved = json.loads(out.read_text())
    assert saved["settings"]["color"] == "bgr" and saved["megaface"]["rank-1"] > 0.8  # a real model


def test_shell_script_passes_its_arguments(tmp_path):
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "r.json")}
    proc = subprocess.run(
        ["bash", str(ROOT / "validation_megaface/eval_megaface.sh"), "m.pt", "pack", "--backbone", "r50"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-m", "validation_megaface.evaluate", "--model", "m.pt", "--root", "pack",
                                   "--json", str(tmp_path / "r.json"), "--backbone", "r50"]  # fmt: skip


def test_shell_script_output_json_argument_then_out_then_default(tmp_path):
    """OUT_JSON, a third argument that is not an option, wins over $OUT, which wins over
    work_dirs/eval/<model>_megaface.json in the repository (here a copy of the launcher); too few
    arguments print the usage."""
    repo = tmp_path / "repo"
    for rel in ("validation_megaface/eval_megaface.sh", "scripts/eval_launcher.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "env.json")}

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(repo / "validation_megaface/eval_megaface.sh"), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, check=False)  # fmt: skip

    head = ["-m", "validation_megaface.evaluate", "--model", "m.pt", "--root", "pack", "--json"]
    proc = launch("m.pt", "pack", "res/mf.json", "--workers", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [*head, "res/mf.json", "--workers", "16"] and (tmp_path / "res").is_dir()
    assert launch("m.pt", "pack", "--workers", "16").stdout.split() == [
        *head, str(tmp_path / "env.json"), "--workers", "16"
    ]  # fmt: skip
    del env["OUT"]
    printed = launch("m.pt", "pack").stdout.split()
    assert printed[:-1] == head
    assert Path(printed[-1]).resolve() == (repo / "work_dirs/eval/m_megaface.json").resolve()
    usage = launch("m.pt")
    assert usage.returncode == 2 and "CKPT_OR_ONNX TESTPACK_ROOT [OUT_JSON]" in usage.stderr


# ------------------------------------------------------------------------------------------ bad input


def test_noise_lists_in_their_real_formats(tmp_path):
    face = tmp_path / "facescrub_noises.txt"
    face.write_text("#Please strictly follow\nAaron_Eckhart_136.png\nOlivia_d'Abo_18077.png\n\n")
    assert read_facescrub_noises(face).entries == {"Aaron_Eckhart_136.png", "Olivia_d'Abo_18077.png"}
    mega = tmp_path / "megaface_noises.txt"
    mega.write_text("#Please\n375/37531198@N00/4174611825_0.jpg\n7\t925/92596048@N00/3910487430_2.jpg\n")
    assert read_megaface_noises(mega).entries == {
        "375/37531198@N00/4174611825_0.jpg", "925/92596048@N00/3910487430_2.jpg"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("which", "line"),
    [("facescrub", "Aaron_Eckhart/Aaron_Eckhart_136.png"), ("facescrub", "Aaron_Eckhart.png"),
     ("megaface", "4174611825_0.jpg"), ("megaface", "375/37531198@N00/4174611825_0.txt")],
)  # fmt: skip
def test_malformed_noise_lines_name_file_and_line(tmp_path, which, line):
    path = tmp_path / f"{which}_noises.txt"
    path.write_text(f"#header\n{line}\n")
    read = read_facescrub_noises if which == "facescrub" else read_megaface_noises
    with pytest.raises(MegaFaceLayoutError, match=rf"{path.name}:2: expected a .*{line!r}"):
        read(path)


def test_unknown_noise_entries_are_an_error_when_strict(testpack, keyed_pack, tmp_path):
    root, _ = testpack
    with pytest.raises(MegaFaceLayoutError, match=r"1 of 2 entries name no image .*Celeb_0000_17.png"):
        evaluate.evaluate_megaface(KeyedEmbedder(keyed_pack[0]), root, tmp_path, strict_noises=True)


def test_missing_parts_are_named(testpack, tmp_path):
    root, _ = testpack
    with pytest.raises(MegaFaceLayoutError, match="facescrub_images: FaceScrub probe folder not found"):
        evaluate.evaluate_megaface(None, tmp_path, tmp_path, keep_noises=True)
    with pytest.raises(FileNotFoundError, match=r"facescrub_noises\.txt: noise list not found"):
        evaluate.evaluate_megaface(None, tmp_path, tmp_path)
    singles = tmp_path / "singles"
    for n in range(3):
        (singles / f"P{n}").mkdir(parents=True)
        shutil.copy(next((root / "facescrub_images").rglob("*.png")), singles / f"P{n}" / f"P{n}_0.png")
    probes = list_facescrub(singles)
    with pytest.raises(ValueError, match="no identity has two probe images"):
        rank1_identification(np.eye(3, dtype=np.float32), probes.ids, np.zeros(3))


def test_unreadable_distractor_is_named(testpack, keyed_pack, tmp_path):
    root, _ = testpack
    pack = tmp_path / "pack"
    shutil.copytree(root, pack)
    bad = sorted((pack / "megaface_images").rglob("*.jpg"))[4]
    bad.write_bytes(b"not an image")
    with pytest.raises(DecodeError, match=rf"{bad.name}: not a decodable image"):
        evaluate.evaluate_megaface(KeyedEmbedder(keyed_pack[0]), pack, tmp_path / "f")
