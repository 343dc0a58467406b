"""What the tools refuse: the evaluators, ``inference.py``, ``scripts.prepare_dataset`` and
``scripts.export_onnx``, on bad model files, bad output paths and bad photos.

Model files are made in a temporary folder from one small MobileFaceNet checkpoint: cut in half, random
bytes, empty, a pickle that would run code when loaded, a whole pickled module instead of its weights, a
folder, a missing path, weights of another architecture, a damaged ONNX model. Output paths: under a
file, in a read-only folder (mode 0o555; root, whom modes do not stop, gets the refusal the kernel would
give anyone else injected where files and folders are created), a folder where the file should go, and a
disk that fills during the write (ENOSPC injected at the atomic writer's fsync). Each case calls the entry
point's ``main(argv)`` in this process and expects one error line naming the file and what is wrong, a
non-zero exit, no traceback, and every file written before left byte for byte as it was.

Photos that give no face are not errors of a run: ``inference.py`` names each one and scores the others,
``prepare_dataset`` lists them in ``failures.txt``; those cases check that the run goes on and says so.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import inference
from backbones import build_backbone
from core.checkpoint import NORMALIZATION, save_checkpoint
from data.decode import encode_jpeg
from data.verification import write_bin
from scripts import export_onnx, prepare_dataset
from tests.bad_inputs.conftest import assert_refused, call_main
from validation_hq import evaluate
from validation_ijb import evaluate as ijb_evaluate
from validation_megaface import evaluate as megaface_evaluate
from validation_tinyface import validate_tinyface

MBF_ONNX = Path("models") / "onnx" / "mobilefacenet_paddle_128d.onnx"


class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for a payload that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(autouse=True)
def one_thread():
    """The few forward passes here are tiny: one thread avoids OpenMP's spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_data) -> Path:
    """A folder of model files, good and bad (see the module docstring)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_backbone("mbf", embedding_size=128).eval()
    meta = {
        "arch": "mbf",
        "embedding_size": 128,
        "input_size": 112,
        "color": "rgb",
        "normalization": NORMALIZATION,
    }
    save_checkpoint(root / "good.pt", {"backbone": model.state_dict(), "meta": meta})
    torch.save(model.state_dict(), root / "plain.pt")
    tiny = build_backbone("mbf", embedding_size=64, input_size=32).eval()  # for the runs that get to the end
    tiny_meta = {**meta, "embedding_size": 64, "input_size": 32}
    save_checkpoint(root / "tiny.pt", {"backbone": tiny.state_dict(), "meta": tiny_meta})
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    (root / "empty.pt").write_bytes(b"")
    torch.save({"format_version": 1, "backbone": RunsCode(root / "code_ran")}, root / "code.pt")
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")
    (root / "folder.pt").mkdir()
    onnx = (shared_data / MBF_ONNX).read_bytes()
    (root / "truncated.onnx").write_bytes(onnx[: len(onnx) // 3])
    (root / "empty.onnx").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def crops(shared_data) -> list[Path]:
    """Aligned 112x112 crops of real faces: 2 photos each of 10 CelebA people."""
    people = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:10]
    return [photo for person in people for photo in sorted(person.glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory, crops) -> Path:
    """A .bin of 20 pairs of those crops (10 same-person, 10 different)."""
    data = [p.read_bytes() for p in crops]
    images, issame = [], []
    for i in range(10):
        images += [data[2 * i], data[2 * i + 1]]
        issame.append(True)
    for i in range(10):
        images += [data[2 * i], data[(2 * i + 3) % len(data)]]
        issame.append(False)
    path = tmp_path_factory.mktemp("bins") / "small.bin"
    write_bin(path, images, issame)
    return path


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes ``folder`` refuse new files and folders, as a read-only mount does."""
    made: list[Path] = []
    real_open, real_mkdir, real_access = os.open, os.mkdir, os.access

    def inside(path) -> bool:
        path = Path(os.path.abspath(os.fspath(path)))
        return any(path == f or f in path.parents for f in made)

    def refuse(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.isdir(path):
            raise refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and inside(path) else real_access(path, mode, *args, **kwargs)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(Path(os.path.abspath(folder)))
        if os.geteuid() == 0:  # root ignores the mode: the kernel's refusal for anyone else, injected
            monkeypatch.setattr(os, "open", fake_open)
            monkeypatch.setattr(os, "mkdir", fake_mkdir)
            monkeypatch.setattr(os, "access", fake_access)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def no_space_left(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk_full(monkeypatch):
    """Writes fail with ENOSPC when they are flushed to disk, as on a full disk."""
    monkeypatch.setattr(os, "fsync", no_space_left)


# ------------------------------------------------------------------------------------------ model files

# (id, model file in the ``models`` folder, extra arguments, fragments the one error line must name)
MODEL_CASES = [
    ("truncated-checkpoint", "truncated.pt", [], ["truncated.pt", "corrupt or truncated"]),
    ("random-bytes", "random.pt", [], ["random.pt", "not a PyTorch file"]),
    ("empty-file", "empty.pt", [], ["empty.pt", "empty file"]),
    ("pickle-that-would-run-code", "code.pt", [], ["code.pt", "refused", "could run code"]),
    ("pickled-module-instead-of-weights", "module.pt", [], ["module.pt", "refused", "state_dict()"]),
    ("folder-given-as-model", "folder.pt", [], ["folder.pt", "a folder"]),
    ("missing-model", "missing.pt", [], ["missing.pt", "not found"]),
    ("weights-of-another-architecture", "plain.pt", ["--backbone", "r18"],
     ["plain.pt", "does not fit backbone 'r18'"]),
    ("unknown-backbone-name", "plain.pt", ["--backbone", "r999"], ["plain.pt", "unknown backbone 'r999'"]),
    ("state-dict-without-its-architecture", "plain.pt", [], ["plain.pt", "--backbone"]),
    ("truncated-onnx", "truncated.onnx", [], ["truncated.onnx", "not a readable ONNX model"]),
    ("empty-onnx", "empty.onnx", [], ["empty.onnx", "empty file"]),
]  # fmt: skip
MODEL_PARAMS = {"argnames": ("name", "extra", "fragments"), "argvalues": [c[1:] for c in MODEL_CASES]}


def model_ids(command: str) -> list[str]:
    return [f"{command}-{c[0]}" for c in MODEL_CASES]


def assert_model_refused(outcome, models: Path, fragments) -> None:
    assert_refused(outcome, *fragments)
    assert "weights_only" not in outcome.err  # never the advice to load the file unsafely
    assert not (models / "code_ran").exists()  # the payload never ran


# --------------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize(**MODEL_PARAMS, ids=model_ids("evaluate"))
def test_evaluate_refuses_the_model(models, small_bin, capsys, unchanged, name, extra, fragments):
    with unchanged(models, small_bin):
        outcome = call_main(
            evaluate.main, ["--model", str(models / name), *extra, "--bins", str(small_bin)], capsys
        )
    assert_model_refused(outcome, models, fragments)


OTHER_EVALUATORS = [
    ("megaface", megaface_evaluate.main, "--root"),
    ("tinyface", validate_tinyface.main, "--data-root"),
]
OTHER_MODEL_CASES = [c for c in MODEL_CASES if c[0] in ("truncated-checkpoint", "pickle-that-would-run-code")]


@pytest.mark.parametrize(
    ("main", "data_option", "name", "fragments"),
    [(m, opt, c[1], c[3]) for _, m, opt in OTHER_EVALUATORS for c in OTHER_MODEL_CASES],
    ids=[f"{cmd}-{c[0]}" for cmd, _, _ in OTHER_EVALUATORS for c in OTHER_MODEL_CASES],
)
def test_other_evaluators_refuse_the_model_alike(
    models, tmp_path, capsys, main, data_option, name, fragments
):
    outcome = call_main(main, ["--model", str(models / name), data_option, str(tmp_path)], capsys)
    assert_model_refused(outcome, models, fragments)


def test_evaluate_refuses_a_missing_bin(models, tmp_path, capsys):
    outcome = call_main(
        evaluate.main, ["--model", str(models / "good.pt"), "--bins", str(tmp_path / "lfw.bin")], capsys
    )
    assert_refused(outcome, "lfw.bin")


@pytest.mark.parametrize(
    ("where", "fragments"),
    [
        ("under-a-file", ["cannot write", "notes.txt is a file, not a folder"]),
        ("in-a-read-only-folder", ["cannot write", "locked/out.json"]),
        ("a-folder-in-its-place", ["cannot write", "out.json", "a folder is in its place"]),
    ],
    ids=["evaluate-json-under-a-file", "evaluate-json-in-a-read-only-folder", "evaluate-json-is-a-folder"],
)
def test_evaluate_refuses_the_output_path_before_any_work(
    models, small_bin, tmp_path, capsys, unchanged, read_only, where, fragments
):
    (tmp_path / "notes.txt").write_text("kept\n")
    target = {
        "under-a-file": tmp_path / "notes.txt" / "out.json",
        "in-a-read-only-folder": read_only(tmp_path / "locked") / "out.json",
        "a-folder-in-its-place": tmp_path / "out.json",
    }[where]
    if where == "a-folder-in-its-place":
        target.mkdir()
    with unchanged(tmp_path):
        outcome = call_main(
            evaluate.main,
            ["--model", str(models / "good.pt"), "--bins", str(small_bin), "--json", str(target)],
            capsys,
        )
    assert_refused(outcome, *fragments)


def test_evaluate_keeps_the_old_results_when_the_disk_fills(models, small_bin, tmp_path, capsys, disk_full):
    out = tmp_path / "out.json"
    out.write_text('{"lfw": "an earlier run"}\n')
    before = out.read_bytes()
    outcome = call_main(
        evaluate.main,
        ["--model", str(models / "tiny.pt"), "--bins", str(small_bin), "--json", str(out)],
        capsys,
    )
    assert_refused(outcome, "cannot write", "out.json", "No space left on device")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_evaluate_names_a_read_only_cache_folder(models, small_bin, tmp_path, capsys, read_only):
    cache = read_only(tmp_path / "cache")
    args = [
        "--model",
        str(models / "tiny.pt"),
        "--bins",
        str(small_bin),
        "--cache",
        str(cache),
        "--workers",
        "0",
    ]
    outcome = call_main(evaluate.main, args, capsys)
    assert_refused(outcome, "cannot write", str(cache))
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (megaface_evaluate.main, ["--root", "{tmp}", "--json", "{tmp}/notes.txt/out.json"]),
        (validate_tinyface.main, ["--data-root", "{tmp}", "--json", "{tmp}/notes.txt/out.json"]),
        (ijb_evaluate.main, ["--ijb-root", "{tmp}", "--out", "{tmp}/notes.txt/results"]),
    ],
    ids=["megaface-json-under-a-file", "tinyface-json-under-a-file", "ijb-out-under-a-file"],
)
def test_other_evaluators_refuse_an_output_under_a_file(models, tmp_path, capsys, unchanged, main, argv):
    (tmp_path / "notes.txt").write_text("kept\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with unchanged(tmp_path):
        outcome = call_main(main, ["--model", str(models / "good.pt"), *argv], capsys)
    assert_refused(outcome, "cannot write", "notes.txt is a file, not a folder")


# -------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize(**MODEL_PARAMS, ids=model_ids("inference"))
def test_inference_refuses_the_model(models, crops, capsys, unchanged, name, extra, fragments):
    args = ["--aligned", "--model", str(models / name), *extra, "--images", *map(str, crops[:3])]
    with unchanged(models):
        outcome = call_main(inference.main, args, capsys)
    assert_model_refused(outcome, models, fragments)


@pytest.mark.parametrize(
    ("detector", "fragments"),
    [
        ("missing.onnx", ["missing.onnx", "not found"]),
        ("random.pt", ["random.pt", "not a readable YuNet detector model"]),
        (
            None,
            ["mobilefacenet_paddle_128d.onnx", "not a YuNet face detector"],
        ),  # an embedder, not a detector
    ],
    ids=[
        "inference-missing-detector",
        "inference-detector-random-bytes",
        "inference-detector-of-another-kind",
    ],
)
def test_inference_refuses_the_detector(models, shared_data, capsys, detector, fragments):
    path = models / detector if detector else shared_data / MBF_ONNX
    photos = sorted(inference.SAMPLES.glob("*.jpg"))
    outcome = call_main(inference.main, ["--detector", str(path), "--images", *map(str, photos)], capsys)
    assert_refused(outcome, *fragments)


def test_inference_needs_two_usable_photos(models, crops, tmp_path, capsys):
    (tmp_path / "notes.jpg").write_text("not an image")
    args = [
        "--aligned",
        "--model",
        str(models / "good.pt"),
        "--images",
        str(tmp_path / "notes.jpg"),
        str(crops[0]),
    ]
    outcome = call_main(inference.main, args, capsys)
    assert_refused(outcome, "1 of 2 photos gave a face", "needs 2")
    assert f"{tmp_path / 'notes.jpg'}: " in outcome.err  # the photo left out is named, with its reason


def test_inference_names_unusable_photos_and_scores_the_rest(models, crops, tmp_path, capsys):
    # proceeds: a cut-off JPEG, a text file, a missing path and a crop of the wrong size are each named
    cut, text, missing, wrong = (tmp_path / n for n in ("cut.jpg", "notes.jpg", "missing.jpg", "big.jpg"))
    cut.write_bytes(crops[0].read_bytes()[:500])
    text.write_text("not an image")
    wrong.write_bytes(encode_jpeg(np.full((150, 150, 3), 100, np.uint8)))
    bad = [cut, text, missing, wrong]
    args = ["--aligned", "--model", str(models / "good.pt"), "--images", *map(str, bad), *map(str, crops[:3])]
    outcome = call_main(inference.main, args, capsys)
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err
    for path in bad:
        assert any(
            line.startswith(f"{path}: ") and line.endswith("left out") for line in outcome.err.splitlines()
        )
    assert outcome.last_error_line == "inference.py: 4 of 7 photos left out (named above)"
    assert outcome.out.splitlines()[-4].split() == [p.name for p in crops[:3]]


# ------------------------------------------------------------------------------------- prepare_dataset


def lfw_photos(shared_data, folder: Path, names: list[str]) -> Path:
    for name in names:
        person = name.rsplit("_", 1)[0]
        (folder / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "lfw_color150" / f"{name}.jpg", folder / person / f"{name}.jpg")
    return folder


def test_prepare_dataset_refuses_two_photos_that_would_share_a_crop(shared_data, tmp_path, capsys, unchanged):
    photos = lfw_photos(shared_data, tmp_path / "photos", ["Aaron_Peirsol_0001"])
    (photos / "Aaron_Peirsol" / "Aaron_Peirsol_0001.png").write_bytes(
        encode_jpeg(np.full((150, 150, 3), 90, np.uint8))  # the suffix alone differs
    )
    out = tmp_path / "out"
    (out / "aligned" / "Aaron_Peirsol").mkdir(parents=True)
    (out / "aligned" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").write_bytes(b"a crop of an earlier run")
    with unchanged(tmp_path):
        outcome = call_main(prepare_dataset.main, [str(photos), str(out), "--workers", "1"], capsys)
    crop = out / "aligned" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    assert_refused(
        outcome, "Aaron_Peirsol_0001.jpg and", "Aaron_Peirsol_0001.png", f"both be aligned to {crop}"
    )


def test_prepare_dataset_refuses_to_pack_when_no_photo_gave_a_face(shared_data, tmp_path, capsys, unchanged):
    photos = tmp_path / "photos"
    for person in ("amy", "bob"):
        (photos / person).mkdir(parents=True)
        (photos / person / "wall.jpg").write_bytes(encode_jpeg(np.full((150, 150, 3), 128, np.uint8)))
    with unchanged(photos):
        outcome = call_main(
            prepare_dataset.main, [str(photos), str(tmp_path / "out"), "--rec", "--workers", "1"], capsys
        )
    assert_refused(outcome, "none of the 2 photos", str(photos), "gave a face", "failures.txt")
    assert not (tmp_path / "out" / "train.rec").exists()


PREPARE_CASES = [
    ("out-is-a-file", ["notes.txt is a file, not a folder"]),
    ("out-under-a-file", ["cannot write", "notes.txt is a file, not a folder"]),
    ("out-in-a-read-only-folder", ["cannot write", "locked/out/failures.txt"]),
    ("photos-missing", ["missing", "not a folder of photos"]),
    ("pairs-missing", ["--pairs", "pairs.txt", "not found"]),
    ("zero-workers", ["--workers", "must be 1 or more"]),
    ("detector-missing", ["missing.onnx", "not found"]),
    ("detector-of-another-kind", ["mobilefacenet_paddle_128d.onnx", "not a YuNet face detector"]),
]


@pytest.mark.parametrize(
    ("case", "fragments"), PREPARE_CASES, ids=[f"prepare-dataset-{case}" for case, _ in PREPARE_CASES]
)
def test_prepare_dataset_refuses_before_aligning(
    shared_data, tmp_path, capsys, unchanged, read_only, case, fragments
):
    photos = lfw_photos(shared_data, tmp_path / "photos", ["Aaron_Peirsol_0001"])
    (tmp_path / "notes.txt").write_text("kept\n")
    out, extra = tmp_path / "out", ["--workers", "1"]
    if case == "out-is-a-file":
        out = tmp_path / "notes.txt"
    elif case == "out-under-a-file":
        out = tmp_path / "notes.txt" / "out"
    elif case == "out-in-a-read-only-folder":
        out = read_only(tmp_path / "locked") / "out"
    elif case == "photos-missing":
        photos = tmp_path / "missing"
    elif case == "pairs-missing":
        extra += ["--pairs", str(tmp_path / "pairs.txt"), "--bin", "x.bin"]
    elif case == "zero-workers":
        extra = ["--workers", "0"]
    elif case == "detector-missing":
        extra += ["--detector", str(tmp_path / "missing.onnx")]
    elif case == "detector-of-another-kind":
        extra += ["--detector", str(shared_data / MBF_ONNX)]
    with unchanged(tmp_path):
        outcome = call_main(prepare_dataset.main, [str(photos), str(out), *extra], capsys)
    assert_refused(outcome, *fragments)


def test_prepare_dataset_names_a_pair_whose_photo_gave_no_face(shared_data, tmp_path, capsys):
    photos = lfw_photos(shared_data, tmp_path / "photos", ["Aaron_Peirsol_0001", "Aaron_Peirsol_0003"])
    (photos / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg").write_bytes(
        encode_jpeg(np.full((150, 150, 3), 128, np.uint8))
    )
    (tmp_path / "pairs.txt").write_text("1\t1\nAaron_Peirsol\t1\t3\n")
    args = [
        str(photos),
        str(tmp_path / "out"),
        "--pairs",
        str(tmp_path / "pairs.txt"),
        "--bin",
        "x.bin",
        "--workers",
        "1",
    ]
    outcome = call_main(prepare_dataset.main, args, capsys)
    assert_refused(outcome, "pairs.txt:2", "Aaron_Peirsol_0003", "not found")
    assert not (tmp_path / "out" / "x.bin").exists()


def test_prepare_dataset_lists_an_unreadable_photo_and_goes_on(shared_data, tmp_path, capsys):
    # proceeds: the cut-off photo is listed as unreadable, the good one aligned
    photos = lfw_photos(shared_data, tmp_path / "photos", ["Aaron_Peirsol_0001", "Aaron_Peirsol_0003"])
    cut = photos / "Aaron_Peirsol" / "Aaron_Peirsol_0003.jpg"
    cut.write_bytes(cut.read_bytes()[:700])
    outcome = call_main(prepare_dataset.main, [str(photos), str(tmp_path / "out"), "--workers", "1"], capsys)
    assert outcome.code == 0 and "Traceback" not in outcome.err, outcome.err
    assert json.loads(outcome.out)["failures"] == 1
    assert (tmp_path / "out" / "failures.txt").read_text() == f"{cut}\tunreadable\n"
    assert "1 photos without a usable face" in outcome.last_error_line


# ----------------------------------------------------------------------------------------- export_onnx


@pytest.mark.parametrize(**MODEL_PARAMS, ids=model_ids("export-onnx"))
def test_export_onnx_refuses_the_model(models, tmp_path, capsys, unchanged, name, extra, fragments):
    with unchanged(models, tmp_path):
        outcome = call_main(
            export_onnx.main, [str(models / name), str(tmp_path / "out.onnx"), *extra], capsys
        )
    assert_model_refused(outcome, models, fragments)


@pytest.mark.parametrize(
    ("where", "fragments"),
    [
        ("under-a-file", ["cannot write", "notes.txt is a file, not a folder"]),
        ("in-a-read-only-folder", ["cannot write", "locked/out.onnx"]),
        ("a-folder-in-its-place", ["cannot write", "out.onnx", "a folder is in its place"]),
    ],
    ids=[
        "export-onnx-out-under-a-file",
        "export-onnx-out-in-a-read-only-folder",
        "export-onnx-out-is-a-folder",
    ],
)
def test_export_onnx_refuses_the_output_path(
    models, tmp_path, capsys, unchanged, read_only, where, fragments
):
    (tmp_path / "notes.txt").write_text("kept\n")
    target = {
        "under-a-file": tmp_path / "notes.txt" / "out.onnx",
        "in-a-read-only-folder": read_only(tmp_path / "locked") / "out.onnx",
        "a-folder-in-its-place": tmp_path / "out.onnx",
    }[where]
    if where == "a-folder-in-its-place":
        target.mkdir()
    with unchanged(tmp_path):
        outcome = call_main(export_onnx.main, [str(models / "good.pt"), str(target)], capsys)
    assert_refused(outcome, *fragments)


def test_export_onnx_refuses_an_onnx_model_as_input(models, shared_data, tmp_path, capsys):
    outcome = call_main(export_onnx.main, [str(shared_data / MBF_ONNX), str(tmp_path / "out.onnx")], capsys)
    assert_refused(outcome, "mobilefacenet_paddle_128d.onnx", "already an exported model")


@pytest.fixture
def quick_export(monkeypatch, shared_data):
    """``export`` writes the real MobileFaceNet ONNX file (exporting a network takes ~20 s on 2 cores):
    what is checked here is what becomes of the file, not the export."""

    def fake_export(embedder, out, fold, opset=17):
        Path(out).write_bytes((shared_data / MBF_ONNX).read_bytes())

    monkeypatch.setattr(export_onnx, "export", fake_export)


@pytest.mark.parametrize(
    "fault", ["check-fails", "disk-full"], ids=lambda f: f"export-onnx-{f}-keeps-the-old-file"
)
def test_export_onnx_keeps_the_old_file(models, tmp_path, capsys, monkeypatch, quick_export, fault):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier, good export")
    if fault == "check-fails":
        monkeypatch.setattr(export_onnx, "verify", lambda *args: 0.25)
        fragments = ["differs from PyTorch", "out.onnx not written"]
    else:
        monkeypatch.setattr(export_onnx, "verify", lambda *args: 0.0)
        monkeypatch.setattr(os, "fsync", no_space_left)
        fragments = ["cannot write", "out.onnx", "No space left on device"]
    outcome = call_main(export_onnx.main, [str(models / "good.pt"), str(out)], capsys)
    assert_refused(outcome, *fragments)
    assert out.read_bytes() == b"an earlier, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temporary file left
