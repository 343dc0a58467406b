"""TinyFace identification on a small TinyFace-style split made of real CelebA crops.

The exact answer is known in advance: a keyed embedder returns, for each image it is shown (found by its
pixels, read independently here with cv2), a feature made of its identity's centre plus noise, so the
ranks can be computed directly, probe by probe, and compared with the evaluator's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.decode import DecodeError
from validation_tinyface.protocol import (
    TinyFaceLayoutError,
    find_testing_set,
    read_identity_list,
    read_tinyface,
)
from validation_tinyface.validate_tinyface import evaluate_tinyface, main

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path("models") / "onnx" / "mobilefacenet_paddle_128d.onnx"


def read_rgb_chw(path: Path, size: int = 112) -> np.ndarray:
    """The pixels the evaluator should see, read the reference way (cv2.imread, BGR->RGB, cv2.resize)."""
    img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def pixel_key(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


class KeyedEmbedder:
    """Features looked up by image content: ``table[pixel_key(image)]``; counts the images it embeds."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table, self.calls = table, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += len(batch)
        return torch.from_numpy(np.stack([self.table[pixel_key(img.numpy())] for img in batch]))


def keyed_features(files_and_ids, dim=8, spread=1.5, seed=0):
    """A table of features for each file and its flip (identity centre + independent noise; identity
    None: pure noise), and the fused unit features the protocol should compute from them."""
    rng = np.random.default_rng(seed)
    centres: dict[object, np.ndarray] = {}
    table, fused = {}, []
    for path, identity in files_and_ids:
        img = read_rgb_chw(path)
        if identity is not None and identity not in centres:
            centres[identity] = rng.normal(size=dim)
        centre = centres[identity] if identity is not None else np.zeros(dim)
        both = []
        for view in (img, img[:, :, ::-1]):
            feature = (centre + rng.normal(scale=spread, size=dim)).astype(np.float32)
            table[pixel_key(view)] = feature
            both.append(feature)
        total = both[0] + both[1]
        fused.append(total / np.linalg.norm(total))
    return table, np.array(fused)


def build_tinyface(shared_data: Path, root: Path, ids: int = 6, per_id: int = 4, distractor_ids: int = 3):
    """Probe/Gallery_Match/Gallery_Distractor from CelebA crops, named ``<id>_<n>.jpg``: two probes and
    two gallery images per identity; distractors are two images each of other identities. One probe is
    stored as a 100x100 PNG (scaled back to 112 by the evaluator)."""
    celeba = shared_data / "celeba_aligned112"
    people = sorted(p for p in celeba.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) >= per_id)
    for name in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (root / name).mkdir(parents=True)
    for person in people[:ids]:
        photos = sorted(person.glob("*.jpg"))[:per_id]
        for n, photo in enumerate(photos):
            folder = "Probe" if n < per_id // 2 else "Gallery_Match"
            shutil.copy(photo, root / folder / f"{person.name}_{n}.jpg")
    for person in people[ids : ids + distractor_ids]:
        for n, photo in enumerate(sorted(person.glob("*.jpg"))[:2]):
            shutil.copy(photo, root / "Gallery_Distractor" / f"{person.name}_{n}.jpg")
    first = sorted((root / "Probe").iterdir())[0]
    small = cv2.resize(cv2.imread(str(first)), (100, 100), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(first.with_suffix(".png")), small)
    first.unlink()
    return root


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors here: torch's thread pool only adds waiting on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(shared_data, tmp_path_factory):
    """A data root laid out like AdaFace's: <root>/aligned_pad_0.1_pad_high/{Probe,...}."""
    root = tmp_path_factory.mktemp("tinyface")
    build_tinyface(shared_data, root / "aligned_pad_0.1_pad_high")
    return root


@pytest.fixture(scope="module")
def keyed(data_root):
    """The keyed embedder of the split and the ranks computed directly from its features."""
    tinyface = read_tinyface(find_testing_set(data_root))
    identity = {p: p.name.split("_")[0] for p in [*tinyface.probes, *tinyface.matches]}
    table, fused = keyed_features([(p, identity.get(p)) for p in tinyface.files])
    n_probe, n_match = len(tinyface.probes), len(tinyface.matches)
    probes, gallery = fused[:n_probe], fused[n_probe:]
    gallery_names = [identity.get(p, "distractor") for p in [*tinyface.matches, *tinyface.distractors]]
    ranks = []
    for p, path in zip(probes, tinyface.probes, strict=True):
        scores = gallery @ p
        mate = max(s for s, g in zip(scores, gallery_names, strict=True) if g == identity[path])
        others = [s for s, g in zip(scores, gallery_names, strict=True) if g != identity[path]]
        ranks.append(1 + sum(s > mate for s in others))
    assert n_match == 12 and len(tinyface.distractors) == 6
    return table, np.array(ranks)


def test_ranks_equal_a_direct_computation(data_root, keyed):
    table, ranks = keyed
    assert (ranks == 1).any() and (ranks > 1).any() and (ranks > 5).any()  # the case can tell
    result = evaluate_tinyface(KeyedEmbedder(table), read_tinyface(find_testing_set(data_root)),
                               batch_size=5)  # fmt: skip
    for k in (1, 5, 20):
        assert result[f"rank-{k}"] == pytest.approx(np.mean(ranks <= k))
    assert (result["probes"], result["gallery_matches"], result["distractors"]) == (12, 12, 6)
    assert result["identities"] == 6


def test_loader_workers_and_chunking_do_not_change_results(data_root, keyed):
    table, _ = keyed
    tinyface = read_tinyface(find_testing_set(data_root))
    a = evaluate_tinyface(KeyedEmbedder(table), tinyface, batch_size=7, workers=0)
    b = evaluate_tinyface(KeyedEmbedder(table), tinyface, batch_size=7, workers=2)
    assert a == b


def test_features_are_cached_and_rescored(data_root, keyed, tmp_path):
    table, _ = keyed
    tinyface = read_tinyface(find_testing_set(data_root))
    embed = KeyedEmbedder(table)
    first = evaluate_tinyface(embed, tinyface, cache=tmp_path, key="m")
    assert embed.calls == 2 * len(tinyface.files) and (tmp_path / "tinyface__m.npz").is_file()

    def no_model(images):
        raise AssertionError("the cache should have answered")

    assert evaluate_tinyface(no_model, tinyface, cache=tmp_path, key="m") == first
    evaluate_tinyface(no_model, tinyface, fusion="unit_mean", cache=tmp_path, key="m")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """Features of the real model, shared by the tests that run it (the second one only scores)."""
    return tmp_path_factory.mktemp("features")


def test_module_form_takes_adaface_fusion_names(shared_data, data_root, real_cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--data_root", str(data_root), "--model", str(shared_data / MODEL), "--color", "bgr",
            "--workers", "0", "--cache", str(real_cache), "--json", str(out)]  # fmt: skip
    assert main([*args, "--fusion", "pre_norm_vector_add"]) == 0
    assert "flip fusion sum" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["fusion"] == "sum"


def test_real_model_from_the_command_line_as_a_file(shared_data, data_root, real_cache, tmp_path):
    """The seed's command shape, run as a file from the repository root, with a real pretrained model (its
    features come from the cache of the test above when it ran first)."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "validation_tinyface/validate_tinyface.py", "--data_root", str(data_root),
         "--model", str(shared_data / MODEL), "--color", "bgr", "--workers", "0", "--json", str(out),
         "--cache", str(real_cache)],
        cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "BGR input, flip fusion sum" in proc.stdout and "rank-20" in proc.stdout
    assert "100x100" in proc.stderr  # the one crop that is not 112x112 is pointed out
    saved = json.loads(out.read_text())
    assert saved["settings"]["color"] == "bgr" and saved["tinyface"]["probes"] == 12
    assert saved["tinyface"]["rank-1"] >= 0.8  # a real model tells these CelebA identities apart


def test_shell_script_passes_its_arguments(tmp_path):
    """eval_tinyface.sh runs the module with the model, the data root, a JSON path and the extra options
    (python replaced by echo, so only the script's own work is checked; the module is tested above)."""
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "out" / "r.json")}
    proc = subprocess.run(
        ["bash", str(ROOT / "validation_tinyface/eval_tinyface.sh"), "m.onnx", "data", "--color", "bgr"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["-m", "validation_tinyface.validate_tinyface", "--model", "m.onnx",
                                   "--data_root", "data", "--json", str(tmp_path / "out" / "r.json"),
                                   "--color", "bgr"]  # fmt: skip
    assert (tmp_path / "out").is_dir()
    usage = subprocess.run(["bash", str(ROOT / "validation_tinyface/eval_tinyface.sh")],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert usage.returncode == 2 and "CKPT_OR_ONNX DATA_ROOT [OUT_JSON]" in usage.stderr


def test_shell_script_output_json_argument_then_out_then_default(tmp_path):
    """OUT_JSON, a third argument that is not an option, wins over $OUT, which wins over
    work_dirs/eval/<model>_tinyface.json in the repository (here a copy of the launcher)."""
    repo = tmp_path / "repo"
    for rel in ("validation_tinyface/eval_tinyface.sh", "scripts/eval_launcher.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    env = {**os.environ, "PYTHON": "echo", "OUT": str(tmp_path / "env.json")}

    def launch(*args: str) -> list[str]:
        proc = subprocess.run(["bash", str(repo / "validation_tinyface/eval_tinyface.sh"), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    head = ["-m", "validation_tinyface.validate_tinyface", "--model", "m.onnx", "--data_root", "data"]
    head.append("--json")
    assert launch("m.onnx", "data", "res/t.json", "--workers", "8") == [*head, "res/t.json", "--workers", "8"]
    assert (tmp_path / "res").is_dir()
    assert launch("m.onnx", "data", "--workers", "8") == [*head, str(tmp_path / "env.json"), "--workers", "8"]
    del env["OUT"]
    printed = launch("m.onnx", "data")
    assert printed[:-1] == head
    assert Path(printed[-1]).resolve() == (repo / "work_dirs/eval/m_tinyface.json").resolve()


def test_layout_errors_name_the_folder(data_root, tmp_path, keyed):
    with pytest.raises(TinyFaceLayoutError, match="no TinyFace test split found"):
        find_testing_set(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(data_root / "aligned_pad_0.1_pad_high", broken)
    shutil.rmtree(broken / "Gallery_Distractor")
    with pytest.raises(TinyFaceLayoutError, match="missing folder Gallery_Distractor"):
        read_tinyface(broken)
    (broken / "Gallery_Distractor").mkdir()
    with pytest.raises(TinyFaceLayoutError, match=r"Gallery_Distractor: no images"):
        read_tinyface(broken)
    shutil.copy(next((broken / "Probe").glob("*.jpg")), broken / "Gallery_Distractor" / "x_1.jpg")
    lonely = broken / "Probe" / "999999_0.jpg"
    shutil.copy(next((broken / "Probe").glob("*.jpg")), lonely)
    with pytest.raises(TinyFaceLayoutError, match=r"identity '999999' of 999999_0.jpg"):
        read_tinyface(broken)
    lonely.rename(broken / "Probe" / "noprefix.jpg")
    expected = r"1 of 25 Probe/Gallery_Match file names \(e.g. Probe/noprefix.jpg\) have no numeric TinyFace"
    with pytest.raises(TinyFaceLayoutError, match=expected):
        read_tinyface(broken)
    (broken / "Probe" / "noprefix.jpg").rename(broken / "Probe" / "x7_0.jpg")  # not a number, not LFW-like
    with pytest.raises(
        TinyFaceLayoutError, match=r"\(e.g. Probe/x7_0.jpg\) have no numeric [^;]*; give each"
    ):
        read_tinyface(broken)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_named(data_root, keyed, tmp_path, workers):
    table, _ = keyed
    broken = tmp_path / "split"
    shutil.copytree(data_root / "aligned_pad_0.1_pad_high", broken)
    bad = sorted((broken / "Gallery_Match").glob("*.jpg"))[3]
    bad.write_bytes(bad.read_bytes()[:500])  # cut off
    with pytest.raises(DecodeError, match=rf"{bad.name}: corrupt JPEG"):
        evaluate_tinyface(KeyedEmbedder(table), read_tinyface(broken), workers=workers)


def test_cli_reports_errors(data_root, shared_data, tmp_path, capsys):
    assert main(["--data_root", str(tmp_path), "--model", str(shared_data / MODEL)]) == 2
    assert "no TinyFace test split found" in capsys.readouterr().err


def test_pixels_match_cv2_for_the_real_crops(data_root):
    """The evaluator's decoder gives the pixels of cv2.imread, so a model sees what the reference sees."""
    from evaluation.extract import ImageFiles

    files = read_tinyface(find_testing_set(data_root)).files[:6]
    loaded = ImageFiles(files)
    for i, path in enumerate(files):
        np.testing.assert_array_equal(loaded[i], read_rgb_chw(path))


# ----------------------------------------------------------------------- names that are not TinyFace's


@pytest.fixture(scope="module")
def lfw_split(shared_data, tmp_path_factory):
    """A split of LFW photos under their own names (First_Last_NNNN.jpg): three Johns and three Michaels
    with 3 photos each (probe, gallery, gallery) and two distractor people; the TinyFace prefix rule would
    see two identities where there are six."""
    photos = shared_data / "lfw_color150"
    people: dict[str, list[Path]] = {}
    for path in sorted(photos.glob("*.jpg")):
        people.setdefault(path.stem.rsplit("_", 1)[0], []).append(path)
    chosen = []
    for first in ("John", "Michael"):
        chosen += [n for n in people if n.split("_")[0] == first and len(people[n]) >= 3][:3]
    root = tmp_path_factory.mktemp("lfw_split")
    for name in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (root / name).mkdir()
    truth = {}
    for person in chosen:
        for n, photo in enumerate(people[person][:3]):
            folder = "Probe" if n == 0 else "Gallery_Match"
            shutil.copy(photo, root / folder / photo.name)
            truth[root / folder / photo.name] = person
    for person in [n for n in people if n.split("_")[0] not in ("John", "Michael")][:2]:
        shutil.copy(people[person][0], root / "Gallery_Distractor" / people[person][0].name)
    return root, truth


def test_lfw_style_names_are_refused_not_merged_by_first_name(lfw_split):
    root, truth = lfw_split
    assert len(set(truth.values())) == 6 and len({name.split("_")[0] for name in truth.values()}) == 2
    with pytest.raises(TinyFaceLayoutError) as caught:
        read_tinyface(root)
    message = str(caught.value)
    assert "18 of 18 Probe/Gallery_Match file names (e.g. Probe/John_" in message
    assert "look like LFW's First_Last_NNNN" in message and "--identities FILE" in message
    assert "\n" not in message


def test_an_identity_list_gives_the_identities(lfw_split, tmp_path, shared_data, capsys):
    root, truth = lfw_split
    listing = tmp_path / "identities.txt"
    lines = ["# image identity"]  # half given as paths under the split, half as bare file names
    for k, (path, person) in enumerate(sorted(truth.items())):
        lines.append(f"{path.relative_to(root).as_posix() if k % 2 else path.name} {person}")
    listing.write_text("\n".join([*lines, "", "Unused_Person_0001.jpg Unused_Person"]) + "\n")
    tinyface = read_tinyface(root, listing)
    assert len(tinyface.identities) == 6 and tinyface.identity_source == str(listing)
    labels = [tinyface.identities[i] for i in [*tinyface.probe_ids, *tinyface.match_ids]]
    by_path = dict(zip([*tinyface.probes, *tinyface.matches], labels, strict=True))
    assert by_path == truth

    # the ranks, computed directly from keyed features of the true identities
    table, fused = keyed_features([(p, truth.get(p)) for p in tinyface.files], seed=3)
    n_probe = len(tinyface.probes)
    gallery_people = [truth.get(p, "distractor") for p in [*tinyface.matches, *tinyface.distractors]]
    ranks = []
    for probe, path in zip(fused[:n_probe], tinyface.probes, strict=True):
        scores = fused[n_probe:] @ probe
        mate = max(s for s, g in zip(scores, gallery_people, strict=True) if g == truth[path])
        ranks.append(
            1 + sum(s > mate for s, g in zip(scores, gallery_people, strict=True) if g != truth[path])
        )
    ranks = np.array(ranks)
    assert (ranks == 1).any() and (ranks > 1).any()  # the case can tell
    result = evaluate_tinyface(KeyedEmbedder(table), tinyface, batch_size=4, ranks=(1, 2, 5))
    for k in (1, 2, 5):
        assert result[f"rank-{k}"] == pytest.approx(np.mean(ranks <= k))
    assert result["identities"] == 6 and result["identities_from"] == str(listing)

    # from the command line, with the real model
    out = tmp_path / "r.json"
    argv = ["--data_root", str(root), "--model", str(shared_data / MODEL), "--color", "bgr", "--workers", "0",
            "--json", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    assert "look like LFW's First_Last_NNNN" in capsys.readouterr().err
    assert main([*argv, "--identities", str(listing)]) == 0
    saved = json.loads(out.read_text())["tinyface"]
    assert saved["identities"] == 6 and saved["probes"] == 6 and saved["gallery_matches"] == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg 1\nb.jpg\n", r"identities.txt:2: 1 fields; expected '<image> <identity>'"),
        ("a.jpg 1 x\n", r"identities.txt:1: 3 fields"),
        ("a.jpg 1\n\na.jpg 2\n", r"identities.txt:3: a.jpg is identity '2' here but '1' at line 1"),
        ("# nothing\n", r"identities.txt: empty identity list"),
    ],
)
def test_bad_identity_lists_name_the_line(tmp_path, text, message):
    listing = tmp_path / "identities.txt"
    listing.write_text(text)
    with pytest.raises(TinyFaceLayoutError, match=message):
        read_identity_list(listing)


def test_an_identity_list_must_cover_every_probe_and_match(lfw_split, tmp_path):
    root, truth = lfw_split
    listing = tmp_path / "identities.txt"
    listing.write_text("".join(f"{p.name} {person}\n" for p, person in sorted(truth.items())[1:]))
    with pytest.raises(
        TinyFaceLayoutError, match=r"identities.txt: no identity for 1 of the 18 Probe/Gallery_Match"
    ):
        read_tinyface(root, listing)
