"""What ``python -m data.recordio`` refuses: ``info``, ``check`` and ``pack`` on damaged inputs.

Every ``.rec`` here is written in ``tmp_path`` by the project's writer (20 identities x 6 faces of 112x112,
insightface layout: meta header at key 0, images at keys 1-120, identity records at keys 121-140) and then
damaged byte by byte, or written with one record changed. Each case runs the real command line and expects
one error line naming the file, the key (or image file) and the fault, a non-zero exit, no traceback, and
the files it was given left byte for byte as they were.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import recordio
from data.decode import encode_jpeg
from data.recordio import IndexedRecordIO, RecordIOWriter, pack
from tests.bad_inputs.conftest import assert_refused, call_main

IDENTITIES, PER_IDENTITY = 20, 6
IMAGES = IDENTITIES * PER_IDENTITY  # keys 1..120
LAST_KEY = IMAGES + IDENTITIES  # 140, the last identity record


def face(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(30, 226, (6, 6, 3), dtype=np.uint8), (size, size), cv2.INTER_CUBIC)


def write_rec(
    prefix: Path,
    replace: dict[int, bytes] | None = None,
    meta: tuple[int, int] | None = None,
    drop: tuple[int, ...] = (),
) -> Path:
    """The 20 x 6 set as ``prefix.rec/.idx``; ``replace`` swaps whole payloads by key, ``meta`` the meta
    header's labels, ``drop`` leaves keys out."""
    jpeg = encode_jpeg(face(0))
    payloads = {0: pack(list(meta or (IMAGES + 1, LAST_KEY + 1)), b"")}
    for c in range(IDENTITIES):
        first = 1 + c * PER_IDENTITY
        for key in range(first, first + PER_IDENTITY):
            payloads[key] = pack(float(c), jpeg, id=key)
        payloads[IMAGES + 1 + c] = pack([first, first + PER_IDENTITY], b"", id=IMAGES + 1 + c)
    payloads.update(replace or {})
    with RecordIOWriter(prefix.with_suffix(".rec")) as writer:
        for key, payload in payloads.items():
            if key not in drop:
                writer.write(key, payload)
    return prefix.with_suffix(".rec")


def poke(rec: Path, key: int, at: int, data: bytes) -> None:
    """Overwrite ``data`` at byte ``at`` of record ``key`` (0 = its part header's magic number)."""
    offset = IndexedRecordIO(rec).offset(key)
    with rec.open("r+b") as fh:
        fh.seek(offset + at)
        fh.write(data)


PAYLOAD = 8  # the record's payload starts after magic + length
IMAGE = PAYLOAD + 24  # the encoded image starts after the 24-byte image header


def truncate_last_record(rec: Path) -> None:
    offset = IndexedRecordIO(rec).offset(LAST_KEY)
    with rec.open("r+b") as fh:
        fh.truncate(offset + PAYLOAD + 10)  # the identity record's 32-byte payload, cut short


def bad_magic_at_100(rec: Path) -> None:
    poke(rec, 100, 0, b"JUNK")


def length_into_next(rec: Path) -> None:
    poke(rec, 50, 4, struct.pack("<I", 5000))  # record 50's length field now runs into key 51


def label_outside_its_range(rec: Path) -> None:
    poke(rec, 10, PAYLOAD + 4, struct.pack("<f", 3.0))  # key 10 is class 1's; its label says 3


def garbage_image(rec: Path) -> None:
    poke(rec, 77, IMAGE, b"GARBAGE!")  # the JPEG's first bytes


def half_jpeg(seed: int = 0) -> bytes:
    data = encode_jpeg(face(seed))
    return data[: len(data) // 2]


# (id, how the data is made from the pristine writer's output, command arguments after the .rec,
#  fragments the one error line must name)
Damage = Callable[[Path], Path]


def damaged(fn: Callable[[Path], None]) -> Damage:
    def make(tmp: Path) -> Path:
        rec = write_rec(tmp / "train")
        fn(rec)
        return rec

    return make


def rewritten(**kwargs) -> Damage:
    return lambda tmp: write_rec(tmp / "train", **kwargs)


PHANTOM = {"meta": (IMAGES + 1, IMAGES + 1 + 25)}  # 25 identities announced, 20 identity records written

INFO_CASES = [
    ("recordio-info-bad-magic-at-key-100", damaged(bad_magic_at_100), ["train.rec", "key 100", "bad magic"]),
    ("recordio-info-truncated-last-record", damaged(truncate_last_record),
     ["train.rec", f"key {LAST_KEY}", "truncated"]),
    ("recordio-info-length-field-runs-into-next-record", damaged(length_into_next),
     ["train.rec", "key 50", "runs past the start of key 51"]),
    ("recordio-info-header-claims-25-identities-20-exist", rewritten(**PHANTOM),
     ["train.rec", "meta header", "25 identities", "not in the index"]),
    ("recordio-info-identity-record-with-empty-range",
     rewritten(replace={IMAGES + 4: pack([19, 19], b"", id=IMAGES + 4)}),
     ["train.rec", f"key {IMAGES + 4}", "class 3", "empty range"]),
    ("recordio-info-identity-ranges-overlap",
     rewritten(replace={IMAGES + 4: pack([17, 25], b"", id=IMAGES + 4)}),
     ["train.rec", f"key {IMAGES + 4}", "class 3", "should start at key 19"]),
    ("recordio-info-meta-header-lost", damaged(lambda rec: poke(rec, 0, 0, b"\0\0\0\0")),
     ["train.rec", "key 0", "bad magic"]),
]  # fmt: skip


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in INFO_CASES], ids=[c[0] for c in INFO_CASES])
def test_info_refuses(tmp_path, capsys, unchanged, make, fragments):
    rec = make(tmp_path)
    with unchanged(tmp_path):
        outcome = call_main(recordio.main, ["info", str(rec)], capsys)
    assert_refused(outcome, *fragments)
    assert "recordio check" in outcome.last_error_line  # says how to see every problem


def test_info_refuses_a_folder_without_train_rec_naming_it_as_a_folder(tmp_path, capsys):
    (tmp_path / "faces" / "amy").mkdir(parents=True)
    outcome = call_main(recordio.main, ["info", str(tmp_path / "faces")], capsys)
    assert_refused(outcome, "faces is a folder without train.rec", "image folder")


def test_info_of_a_folder_holding_train_rec_describes_it(tmp_path, capsys):
    write_rec(tmp_path / "train")
    outcome = call_main(recordio.main, ["info", str(tmp_path)], capsys)
    assert outcome.code == 0, outcome.err
    summary = json.loads(outcome.out)
    assert (summary["path"], summary["images"], summary["identities"]) == (
        str(tmp_path / "train.rec"), IMAGES, IDENTITIES,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ check

CHECK_CASES = [
    ("recordio-check-bad-magic-at-key-100", damaged(bad_magic_at_100), ["train.rec", "key 100", "bad magic"]),
    ("recordio-check-truncated-last-record", damaged(truncate_last_record),
     ["train.rec", f"key {LAST_KEY}", "truncated"]),
    ("recordio-check-length-field-runs-into-next-record", damaged(length_into_next),
     ["train.rec", "key 50", "runs past"]),
    ("recordio-check-undecodable-image-at-key-77", damaged(garbage_image),
     ["train.rec key 77", "not a decodable image"]),
    ("recordio-check-truncated-jpeg-at-key-33", rewritten(replace={33: pack(5.0, half_jpeg(), id=33)}),
     ["train.rec key 33", "truncated JPEG"]),
    ("recordio-check-empty-image-at-key-12", rewritten(replace={12: pack(1.0, b"", id=12)}),
     ["train.rec key 12", "empty image"]),
    ("recordio-check-150x150-image-at-key-5",
     rewritten(replace={5: pack(0.0, encode_jpeg(face(1, 150)), id=5)}),
     ["train.rec key 5", "150x150", "112x112"]),
    ("recordio-check-label-outside-its-identity-range", damaged(label_outside_its_range),
     ["train.rec", "key 10", "label 3", "class 1"]),
    ("recordio-check-non-integer-label-at-key-8",
     rewritten(replace={8: pack(1.5, encode_jpeg(face(0)), id=8)}), ["train.rec", "key 8", "label 1.5"]),
    ("recordio-check-header-claims-25-identities-20-exist", rewritten(**PHANTOM),
     ["train.rec", "25 identities", "not in the index"]),
    ("recordio-check-image-record-missing-from-index", rewritten(drop=(60,)),
     ["train.rec", "no key 60"]),
    ("recordio-check-stray-key-outside-the-layout",
     rewritten(replace={500: pack(3.0, encode_jpeg(face(0)), id=500)}),
     ["train.rec", "1 keys", "outside the layout", "500"]),
]  # fmt: skip


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check_refuses(tmp_path, capsys, unchanged, make, fragments):
    rec = make(tmp_path)
    with unchanged(tmp_path):
        outcome = call_main(recordio.main, ["check", str(rec), "--workers", "1"], capsys)
    assert_refused(outcome, *fragments)


def test_check_reports_every_problem_not_only_the_first(tmp_path, capsys):
    rec = write_rec(tmp_path / "train", replace={12: pack(1.0, b"", id=12)})
    bad_magic_at_100(rec)
    garbage_image(rec)
    label_outside_its_range(rec)
    outcome = call_main(recordio.main, ["check", str(rec), "--workers", "2"], capsys)
    assert_refused(outcome, "4 problems", "key 100", "bad magic")  # the index scan comes first
    lines = outcome.err.splitlines()[:-1]
    assert len(lines) == 4, outcome.err
    for line, key in zip(lines, ["key 100", "key 12", "key 77", "key 10:"], strict=True):
        assert key in line, (key, line)
    assert json.loads(outcome.out)["problems"] == 4


def test_check_an_image_folder_names_every_bad_file(tmp_path, capsys, unchanged):
    root = tmp_path / "faces"
    for c in range(3):
        (root / f"id{c}").mkdir(parents=True)
        for n in range(3):
            (root / f"id{c}" / f"{n}.jpg").write_bytes(encode_jpeg(face(n)))
    (root / "id1" / "1.jpg").write_bytes(half_jpeg())
    (root / "id2" / "0.jpg").write_bytes(encode_jpeg(face(0, 96)))
    with unchanged(root):
        outcome = call_main(recordio.main, ["check", str(root), "--workers", "1"], capsys)
    assert_refused(outcome, "2 problems", "id1/1.jpg", "truncated JPEG")
    assert "id2/0.jpg: 96x96 image" in outcome.err


def test_check_passes_real_faces_packed(shared_data, tmp_path, capsys):
    """A slice of the demo's real CelebA crops, packed by the project: no problem, exit 0, on 2 processes."""
    src = tmp_path / "src"
    for person in sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[:25]:
        shutil.copytree(person, src / person.name)
    images = len(list(src.glob("*/*.jpg")))
    assert call_main(recordio.main, ["pack", str(src), str(tmp_path / "celeba" / "train")], capsys).code == 0
    outcome = call_main(recordio.main, ["check", str(tmp_path / "celeba"), "--workers", "2"], capsys)
    assert outcome.code == 0, outcome.err
    summary = json.loads(outcome.out)
    assert (summary["images"], summary["identities"], summary["problems"]) == (images, 25, 0)
    assert outcome.err == ""


# ------------------------------------------------------------------------------------------------- pack


def face_folder(root: Path) -> Path:
    """3 identities x 2 good 112x112 faces."""
    for c in range(3):
        (root / f"id{c}").mkdir(parents=True, exist_ok=True)
        for n in range(2):
            (root / f"id{c}" / f"{n}.jpg").write_bytes(encode_jpeg(face(10 * c + n)))
    return root


def big_jpeg() -> bytes:
    return encode_jpeg(np.zeros((8000, 8000, 3), np.uint8), quality=50)


# (id, file added to a good folder, its bytes (None: an empty folder), fragments of the error line)
PACK_CASES = [
    ("recordio-pack-8000x8000-photo", "id1/huge.jpg", big_jpeg, ["huge.jpg", "8000x8000", "112x112"]),
    ("recordio-pack-150x150-crop", "id1/lfw.jpg", lambda: encode_jpeg(face(3, 150)),
     ["lfw.jpg", "150x150", "112x112", "--resize"]),
    ("recordio-pack-150x150-png", "id0/c.png", lambda: cv2.imencode(".png", face(4, 150))[1].tobytes(),
     ["c.png", "150x150"]),
    ("recordio-pack-truncated-jpeg", "id2/cut.jpg", half_jpeg, ["cut.jpg", "truncated JPEG"]),
    ("recordio-pack-empty-file", "id2/empty.jpg", lambda: b"", ["empty.jpg", "empty image"]),
    ("recordio-pack-text-named-jpg", "id0/notes.jpg", lambda: b"hello, not a face",
     ["notes.jpg", "not a decodable image"]),
    ("recordio-pack-empty-identity-folder", "id9", None, ["id9", "without images", "--allow-empty"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rel", "data", "fragments"), [c[1:] for c in PACK_CASES], ids=[c[0] for c in PACK_CASES]
)
def test_pack_refuses(tmp_path, capsys, unchanged, rel, data, fragments):
    root = face_folder(tmp_path / "faces")
    if data is None:
        (root / rel).mkdir()
    else:
        (root / rel).write_bytes(data())
    with unchanged(tmp_path):  # no partial output either
        outcome = call_main(recordio.main, ["pack", str(root), str(tmp_path / "out" / "train")], capsys)
    assert_refused(outcome, *fragments)


def test_pack_refuses_to_replace_an_existing_set(tmp_path, capsys, unchanged):
    root = face_folder(tmp_path / "faces")
    assert call_main(recordio.main, ["pack", str(root), str(tmp_path / "train")], capsys).code == 0
    (root / "id0" / "0.jpg").unlink()  # a different set, packed to the same name
    with unchanged(tmp_path / "train.rec", tmp_path / "train.idx", tmp_path / "train.lst"):
        outcome = call_main(recordio.main, ["pack", str(root), str(tmp_path / "train")], capsys)
    assert_refused(outcome, "train.rec exists", "--overwrite")


def test_pack_resizes_when_asked(tmp_path, capsys):
    root = face_folder(tmp_path / "faces")
    (root / "id1" / "lfw.jpg").write_bytes(encode_jpeg(face(3, 150)))
    outcome = call_main(recordio.main, ["pack", str(root), str(tmp_path / "train"), "--resize"], capsys)
    assert outcome.code == 0, outcome.err
    assert json.loads(outcome.out)["resized"] == 1
    assert (
        call_main(recordio.main, ["check", str(tmp_path / "train.rec"), "--workers", "1"], capsys).code == 0
    )
