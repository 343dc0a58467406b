"""What ``train.py`` refuses in its data: bad records met mid-run (with and without DataLoader workers),
identity tables that disagree with the labels, and sets a classifier cannot learn from.

The data is a slice of the real CelebA crops (4 identities, 112x112) packed by the project, then damaged.
A run trains MobileFaceNet at a 32x32 network input for a step or two, so each case takes about a second.
Every refusal is one line on stderr naming the file and record key (or image file) and the fault, exit 2,
no traceback, the same line at the end of ``train.log`` when the run had started, and the data untouched.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from core.config import DataConfig
from data.builder import build_train_dataset
from data.decode import encode_jpeg
from data.recordio import IndexedRecordIO, RecordIOFaceSet, RecordIOWriter, pack, pack_folder, unpack
from data.sampler import GlobalBatchSampler, KeyedFaceDataset
from tests.bad_inputs.conftest import ROOT, assert_refused, call_main

CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")
SEED, BATCH = 2048, 8  # cpu_tiny's experiment.seed; the per-process batch used here


@pytest.fixture(scope="module")
def celeba_rec(shared_data, tmp_path_factory) -> Path:
    """4 real identities packed into ``train.rec``; returns the folder."""
    src = tmp_path_factory.mktemp("faces")
    for person in sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:4]:
        shutil.copytree(person, src / person.name)
    out = tmp_path_factory.mktemp("rec")
    pack_folder(src, out / "train")
    return out


def first_batch_keys(rec_dir: Path, count: int = 1) -> list[int]:
    """Keys of the first images epoch 0 reads (position i is key i + 1 in the packed layout)."""
    faces = RecordIOFaceSet(rec_dir / "train.rec")
    order = GlobalBatchSampler(len(faces), BATCH, seed=SEED).order(0)
    return [int(i) + 1 for i in order[:count]]


def copy_rec(src: Path, dst: Path, replace: dict[int, bytes] | None = None) -> Path:
    """``src/train.rec`` rewritten to ``dst`` by the project's writer, with the payloads of ``replace``."""
    dst.mkdir(parents=True, exist_ok=True)
    with IndexedRecordIO(src / "train.rec") as rio, RecordIOWriter(dst / "train.rec") as writer:
        for key, payload in rio:
            writer.write(key, (replace or {}).get(key, payload))
    return dst


def with_image(rec_dir: Path, key: int, image: bytes) -> bytes:
    header, _ = unpack(IndexedRecordIO(rec_dir / "train.rec").read(key))
    return pack(header.label, image, id=header.id)


def run_train(capsys, data: Path, out: Path, *extra: str, steps: int = 1):
    argv = ["--config", CONFIG, "--set", f"data.root={data}", f"output_dir={out}", "data.val_root=''",
            f"data.batch_size={BATCH}", "model.input_size=32", "model.embedding_size=64", "train.epochs=1",
            f"train.max_steps={steps}", "train.log_every=1", *extra]  # fmt: skip
    return call_main(train.main, argv, capsys)


def last_log_line(out: Path) -> str:
    return (out / "train.log").read_text().splitlines()[-1]


# ------------------------------------------------------------------------------- bad records mid-run

GARBAGE = b"GARBAGE! not an image"
MID_RUN = [
    ("training-undecodable-image-mid-run-workers-0", GARBAGE, "0", ["not a decodable image"]),
    ("training-undecodable-image-mid-run-workers-2", GARBAGE, "2", ["not a decodable image"]),
    ("training-empty-image-mid-run-workers-2", b"", "2", ["empty image data"]),
    ("training-truncated-jpeg-mid-run-workers-2", "half", "2", ["truncated JPEG"]),
    ("training-150x150-image-mid-run-workers-0", "150", "0", ["150x150 image", "112x112"]),
    ("training-150x150-image-mid-run-workers-2", "150", "2", ["150x150 image", "112x112"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("image", "workers", "fragments"), [c[1:] for c in MID_RUN], ids=[c[0] for c in MID_RUN]
)
def test_a_bad_record_reached_mid_run_stops_with_one_line(
    celeba_rec, tmp_path, capsys, unchanged, image, workers, fragments
):
    key = first_batch_keys(celeba_rec)[0]
    good = unpack(IndexedRecordIO(celeba_rec / "train.rec").read(key))[1]
    if image == "half":
        image = good[: len(good) // 2]
    elif image == "150":
        image = encode_jpeg(np.full((150, 150, 3), 128, np.uint8))
    data = copy_rec(celeba_rec, tmp_path / "data", {key: with_image(celeba_rec, key, image)})
    with unchanged(data):
        outcome = run_train(capsys, data, tmp_path / "out", f"data.num_workers={workers}")
    assert_refused(outcome, f"train.rec key {key}", *fragments, "data.bad_records=skip")
    assert outcome.code == 2
    assert last_log_line(tmp_path / "out").endswith(
        f"stopped: {outcome.last_error_line[len('train.py: ') :]}"
    )
    assert not list((tmp_path / "out").glob("*.pt"))  # stopped before any step was taken


def test_an_undecodable_file_of_an_image_folder_is_named_with_workers(
    tmp_path, capsys, shared_data, unchanged
):
    root = tmp_path / "faces"
    for person in sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:3]:
        shutil.copytree(person, root / person.name)
    bad = sorted(root.glob("*/*.jpg"))[5]
    bad.write_bytes(b"not a jpeg at all")
    with unchanged(root):
        # every image is read once in the epoch; batch = all images, so the bad one is in the first batch
        outcome = run_train(capsys, root, tmp_path / "out", "data.num_workers=2",
                            f"data.batch_size={len(list(root.glob('*/*.jpg')))}")  # fmt: skip
    assert_refused(outcome, str(bad), "not a decodable image")


def test_skip_mode_trains_on_and_counts_the_bad_record(celeba_rec, tmp_path, capsys, unchanged):
    key = first_batch_keys(celeba_rec)[0]
    data = copy_rec(celeba_rec, tmp_path / "data", {key: with_image(celeba_rec, key, b"")})
    with unchanged(data):
        outcome = run_train(capsys, data, tmp_path / "out", "data.num_workers=2", "data.bad_records=skip")
    assert outcome.code == 0, outcome.err
    log = (tmp_path / "out" / "train.log").read_text()
    assert f"bad record, trained on another image of its identity instead: {data}/train.rec key {key}" in log
    reports = [line for line in log.splitlines() if " step " in line and "bad_records" in line]
    assert len(reports) == 1 and re.search(r" bad_records 1( |$)", reports[0]), log
    assert "1 bad records skipped (data.bad_records=skip)" in log.splitlines()[-1]


def test_skip_mode_stops_past_max_bad_records(celeba_rec, tmp_path, capsys, unchanged):
    keys = first_batch_keys(celeba_rec, 2)
    data = copy_rec(
        celeba_rec, tmp_path / "data", {k: with_image(celeba_rec, k, b"\xff\xd8\xff") for k in keys}
    )
    with unchanged(data):
        outcome = run_train(capsys, data, tmp_path / "out", "data.num_workers=0", "data.bad_records=skip",
                            "data.max_bad_records=1")  # fmt: skip
    assert_refused(outcome, "2 bad records, more than data.max_bad_records=1", "JPEG", "recordio check")
    assert "stopped: 2 bad records" in last_log_line(tmp_path / "out")


# ------------------------------------------------------------------------------ refused before step 1


def poke_label(rec_dir: Path, key: int, label: float) -> None:
    offset = IndexedRecordIO(rec_dir / "train.rec").offset(key)
    with (rec_dir / "train.rec").open("r+b") as fh:
        fh.seek(offset + 8 + 4)
        fh.write(struct.pack("<f", label))


def phantom_classes(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """The meta header announces 5 more identities than there are identity records."""
    meta = unpack(IndexedRecordIO(src / "train.rec").read(0))[0].labels
    data = copy_rec(src, dst, {0: pack([meta[0], meta[1] + 5], b"")})
    return data, ["train.rec", "meta header", "9 identities", "5 of their records are not in the index"]


def mislabelled(src: Path, dst: Path) -> tuple[Path, list[str]]:
    data = copy_rec(src, dst)
    poke_label(data, 3, 2.0)  # key 3 belongs to class 0
    return data, ["train.rec", "key 3", "label 2", "class 0"]


def headerless_label_gap(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """An im2rec-style rec (no header) whose labels are 0, 1 and 5: classes 2-4 do not exist."""
    dst.mkdir(parents=True)
    faces = RecordIOFaceSet(src / "train.rec")
    with RecordIOWriter(dst / "train.rec") as writer:
        for i, label in enumerate([0] * 8 + [1] * 8 + [5] * 8):
            writer.write(100 + i, pack(float(label), faces.image_bytes(i)))
    return dst, ["train.rec", "key 116", "label 5", "0..2"]


def one_identity(src: Path, dst: Path) -> tuple[Path, list[str]]:
    faces = RecordIOFaceSet(src / "train.rec")
    first, end = faces.identity_ranges[0]
    root = dst / "faces" / "only_one"
    root.mkdir(parents=True)
    for i in range(first - 1, end - 1):
        (root / f"{i}.jpg").write_bytes(faces.image_bytes(i))
    return dst / "faces", ["faces holds 1 identity", "at least 2"]


def empty_identity_folder(src: Path, dst: Path) -> tuple[Path, list[str]]:
    data, _ = one_identity(src, dst)
    shutil.copytree(data / "only_one", data / "second")
    (data / "empty").mkdir()
    return data, ["faces", "1 identity folder(s) without images: empty", "remove them"]


BEFORE_STEP_1 = [
    ("training-header-claims-9-identities-4-exist", phantom_classes),
    ("training-label-outside-its-identity-range", mislabelled),
    ("training-headerless-labels-0-1-5", headerless_label_gap),
    ("training-one-identity", one_identity),
    ("training-empty-identity-folder", empty_identity_folder),
]


@pytest.mark.parametrize("make", [c[1] for c in BEFORE_STEP_1], ids=[c[0] for c in BEFORE_STEP_1])
def test_data_that_cannot_train_a_classifier_is_refused_before_step_1(
    celeba_rec, tmp_path, capsys, unchanged, make
):
    data, fragments = make(celeba_rec, tmp_path / "data")
    with unchanged(data):
        outcome = run_train(capsys, data, tmp_path / "out", "data.num_workers=0")
    assert_refused(outcome, *fragments)
    assert "allow_empty=True" not in outcome.err  # no advice train.py cannot follow


SETTINGS = [
    ("training-bad-records-unknown-mode", "data.bad_records=ignore", ["data.bad_records", "'stop', 'skip'"]),
    ("training-max-bad-records-negative", "data.max_bad_records=-1", ["data.max_bad_records", ">= 0", "-1"]),
]


@pytest.mark.parametrize(("setting", "fragments"), [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_bad_record_settings_are_checked(celeba_rec, tmp_path, capsys, setting, fragments):
    outcome = run_train(capsys, celeba_rec, tmp_path / "out", "data.num_workers=0", setting)
    assert_refused(outcome, *fragments)


# ------------------------------------------------------------------------- how skip mode replaces


def test_skip_mode_replaces_a_bad_record_by_its_identity_alike_with_and_without_workers(celeba_rec, tmp_path):
    key = first_batch_keys(celeba_rec)[0]
    data = copy_rec(celeba_rec, tmp_path / "data", {key: with_image(celeba_rec, key, b"")})
    cfg = DataConfig(root=str(data), bad_records="skip")
    keyed = KeyedFaceDataset(build_train_dataset(cfg, seed=SEED), seed=SEED)
    image, label, index = keyed[(0, key - 1)]
    assert index != key - 1 and keyed.source.label(index) == keyed.source.label(key - 1) == int(label)
    assert torch.equal(image, keyed[(0, index)][0])  # the replacement, as it is read on its own
    assert keyed[(0, key - 1)][2] == index  # drawn from (seed, epoch, position): the same every time
    batches = []
    for workers in (0, 2):
        dataset = KeyedFaceDataset(build_train_dataset(cfg, seed=SEED), seed=SEED)
        batches.append(
            next(iter(dataset.loader(GlobalBatchSampler(len(dataset), BATCH, seed=SEED), workers)))
        )
        assert dataset.bad_records.found == {key - 1: f"{data / 'train.rec'} key {key}: empty image data"}
    assert index in batches[0][2].tolist()
    for a, b in zip(batches[0], batches[1], strict=True):
        assert torch.equal(a, b)
