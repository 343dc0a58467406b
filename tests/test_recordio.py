"""RecordIO reader/writer against files written by MXNet 1.9.1, round trips, fork safety and bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.decode import DecodeError
from data.recordio import (
    MAGIC_BYTES,
    FolderLayoutError,
    IndexedRecordIO,
    RecordIOError,
    RecordIOFaceSet,
    RecordIOWriter,
    RecordLabelError,
    main,
    pack,
    pack_folder,
    unpack,
)

FIXTURES = Path(__file__).parent / "fixtures" / "recordio"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_fixture(name: str, dest: Path) -> Path:
    """Copy ``name.rec``/``name.idx`` into ``dest`` (so a test may damage them); returns the .rec path."""
    for suffix in (".rec", ".idx"):
        shutil.copy(FIXTURES / f"{name}{suffix}", dest / f"{name}{suffix}")
    return dest / f"{name}.rec"


def synthetic_jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size, size))
    return cv2.imencode(".jpg", img)[1].tobytes()


# --------------------------------------------------------------------------------------------------
# Files written by MXNet
# --------------------------------------------------------------------------------------------------


def test_fixtures_hold_every_continuation_flag() -> None:
    """Guards the tests below: MXNet really split records into parts flagged 1, 2 and 3."""
    raw = (FIXTURES / "chunks.rec").read_bytes()
    offsets = {r["key"]: r["offset"] for r in EXPECTED["chunks"]["records"]}
    flags = []
    for key in (2, 3):  # key 3 = b"xxxx" + magic + magic + b"yy": parts 1, 2 (empty), 3
        offset = offsets[key]
        while True:
            magic, lrec = struct.unpack_from("<II", raw, offset)
            assert magic == 0xCED7230A
            flags.append(lrec >> 29)
            offset += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
            if flags[-1] in (0, 3):
                break
    assert flags == [1, 3, 1, 2, 3]
    parts = [r["parts"] for r in EXPECTED["insightface"]["records"]]
    assert [1, 2, 2, 3] in parts


@pytest.mark.parametrize("record", EXPECTED["chunks"]["records"], ids=lambda r: f"key{r['key']}")
def test_mxnet_multipart_records_are_joined(record: dict) -> None:
    with IndexedRecordIO(FIXTURES / "chunks.rec") as rio:
        assert rio.read(record["key"]) == bytes.fromhex(record["payload_hex"])
        assert rio.offset(record["key"]) == record["offset"]


def test_insightface_layout_from_mxnet() -> None:
    exp = EXPECTED["insightface"]
    faces = RecordIOFaceSet(FIXTURES / exp["rec"])
    assert faces.has_header
    assert faces.num_images == len(faces) == exp["num_images"] == 8
    assert faces.num_identities == len(exp["identity_ranges"]) == 3
    assert faces.identity_ranges.tolist() == exp["identity_ranges"]
    by_key = {r["key"]: r for r in exp["records"]}
    for i in range(len(faces)):
        rec = by_key[faces.key(i)]
        image, label = faces[i]
        assert faces.key(i) == i + 1
        assert sha256(image) == rec["image_sha256"] and len(image) == rec["image_len"]
        assert label == faces.label(i) == int(rec["labels"][0])
        header = faces.header(i)
        assert (header.flag, list(header.labels), header.id, header.id2) == (
            rec["flag"],
            rec["labels"],
            rec["id"],
            rec["id2"],
        )
        assert cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    assert faces.labels().tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert faces.header(3).labels == (1.0, 0.25, 7.0)  # the flag=3 multi-label record
    assert MAGIC_BYTES in faces.image_bytes(5)  # the multi-part image, magic restored between parts


def test_header_less_im2rec_from_mxnet() -> None:
    exp = EXPECTED["im2rec"]
    faces = RecordIOFaceSet(FIXTURES / exp["rec"])
    assert not faces.has_header
    assert [faces.key(i) for i in range(len(faces))] == exp["keys"] == [0, 1, 2, 3, 4, 5]
    for i, rec in enumerate(exp["records"]):
        image, label = faces[i]
        assert (sha256(image), label) == (rec["image_sha256"], int(rec["labels"][0]))
    assert faces.num_identities == 3
    assert faces.identity_ranges.tolist() == [[0, 2], [2, 5], [5, 6]]
    assert {c: p.tolist() for c, p in faces.indices_per_identity().items()} == {
        0: [0, 1],
        1: [2, 3, 4],
        2: [5],
    }


@pytest.mark.parametrize("name", ["insightface", "im2rec", "chunks"])
def test_writer_output_is_byte_identical_to_mxnet(name: str, tmp_path: Path) -> None:
    with IndexedRecordIO(FIXTURES / f"{name}.rec") as rio, RecordIOWriter(tmp_path / f"{name}.rec") as writer:
        for key, payload in rio:
            writer.write(key, payload)
    assert (tmp_path / f"{name}.rec").read_bytes() == (FIXTURES / f"{name}.rec").read_bytes()
    assert (tmp_path / f"{name}.idx").read_bytes() == (FIXTURES / f"{name}.idx").read_bytes()


def test_pack_and_unpack_match_mxnet_payloads() -> None:
    by_key = {r["key"]: r for r in EXPECTED["insightface"]["records"]}
    with IndexedRecordIO(FIXTURES / "insightface.rec") as rio:
        for key in (1, 4, 9):  # scalar label, three labels, identity record
            header, image = unpack(rio.read(key))
            label = header.label if header.flag == 0 else list(header.labels)
            assert pack(label, image, id=header.id, id2=header.id2) == rio.read(key)
            assert sha256(rio.read(key)) == by_key[key]["payload_sha256"]


# --------------------------------------------------------------------------------------------------
# Our writer, read back
# --------------------------------------------------------------------------------------------------


def test_random_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = rng.permutation(200).tolist()  # not in key order: iteration must follow the .idx
    payloads = {}
    for key in keys:
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 3))):  # plant magics, aligned or not
            at = int(rng.integers(0, len(body) + 1))
            body[at:at] = MAGIC_BYTES
        payloads[key] = bytes(body)
    with RecordIOWriter(tmp_path / "r.rec") as writer:
        for key in keys:
            writer.write(key, payloads[key])
    rio = IndexedRecordIO(tmp_path / "r.rec")
    assert rio.keys.tolist() == keys and len(rio) == 200
    assert all(rio.read(k) == payloads[k] for k in rng.permutation(200).tolist())
    assert [k for k, _ in rio] == keys
    assert 7 in rio and 200 not in rio
    with pytest.raises(KeyError, match="no key 200"):
        rio.read(200)


def test_header_less_interleaved_labels(tmp_path: Path) -> None:
    labels = [1, 0, 1, 2, 0]
    with RecordIOWriter(tmp_path / "s.rec") as writer:
        for key, label in enumerate(labels):
            writer.write(key, pack(label, synthetic_jpeg(key), id=key))
    faces = RecordIOFaceSet(tmp_path / "s.rec")
    assert not faces.has_header and faces.num_identities == 3 and faces.labels().tolist() == labels
    assert {c: p.tolist() for c, p in faces.indices_per_identity().items()} == {0: [1, 4], 1: [0, 2], 2: [3]}
    with pytest.raises(
        RecordIOError, match=r"s\.rec: no header, and the images of label 0 are not consecutive"
    ):
        faces.identity_ranges  # noqa: B018


def test_writer_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a.rec"
    with RecordIOWriter(target) as writer:
        writer.write(0, b"old")
    old = target.read_bytes(), (tmp_path / "a.idx").read_bytes()
    with pytest.raises(RuntimeError), RecordIOWriter(target) as writer:
        writer.write(0, b"new")
        assert IndexedRecordIO(target).read(0) == b"old"  # nothing replaced before close
        raise RuntimeError("interrupted")
    assert (target.read_bytes(), (tmp_path / "a.idx").read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]  # no temporary files left
    with pytest.raises(ValueError, match="key 0 written twice"), RecordIOWriter(target) as writer:
        writer.write(0, b"x")
        writer.write(0, b"y")


def test_writer_on_a_full_disk_names_the_file_and_keeps_the_old_pair(tmp_path, monkeypatch):
    import errno
    import os

    from core.fileio import WriteError

    target = tmp_path / "a.rec"
    with RecordIOWriter(target) as writer:
        writer.write(0, b"old")
    old = target.read_bytes(), (tmp_path / "a.idx").read_bytes()

    def no_space_left(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space_left)  # the disk fills when the records are flushed
    with pytest.raises(WriteError) as caught, RecordIOWriter(target) as writer:
        writer.write(0, b"new")
    assert str(caught.value) == f"cannot write {target}: No space left on device"
    assert (target.read_bytes(), (tmp_path / "a.idx").read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]  # no temporary files left
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder was meant")
    with pytest.raises(WriteError, match=f"cannot write .*: {blocker} is a file, not a folder"):
        RecordIOWriter(blocker / "b.rec")


def make_folder(root: Path) -> dict[str, bytes]:
    """Identities b (2 JPEGs), a (JPEG + PNG + grey PGM), c (1 JPEG), all 32x32, and three entries to be
    ignored (a text file, a top-level file, a folder inside an identity)."""
    files = {
        "b/1.jpg": synthetic_jpeg(1),
        "b/0.jpg": synthetic_jpeg(2),
        "a/x.jpg": synthetic_jpeg(3),
        "a/y.png": cv2.imencode(".png", np.full((32, 32, 3), (10, 120, 240), np.uint8))[1].tobytes(),
        "a/z.pgm": cv2.imencode(".pgm", np.full((32, 32), 77, np.uint8))[1].tobytes(),
        "c/q.JPEG": synthetic_jpeg(4),
        "a/notes.txt": b"not an image",
        "README": b"top-level file",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "c" / "more").mkdir()  # a folder inside an identity is not an image either
    return files


def test_pack_folder(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "imgs")
    summary = pack_folder(tmp_path / "imgs", tmp_path / "out" / "train", image_size=32)
    assert (summary["images"], summary["identities"], summary["reencoded"]) == (6, 3, 2)
    assert sorted(Path(p).name for p in summary["ignored"]) == ["README", "more", "notes.txt"]
    order = ["a/x.jpg", "a/y.png", "a/z.pgm", "b/0.jpg", "b/1.jpg", "c/q.JPEG"]
    lst = (tmp_path / "out" / "train.lst").read_text().splitlines()
    assert lst == [
        f"{k}\t{lab:.6f}\t{p}" for k, (lab, p) in enumerate(zip([0, 0, 0, 1, 1, 2], order, strict=True), 1)
    ]
    faces = RecordIOFaceSet(tmp_path / "out" / "train.rec")
    assert faces.has_header and faces.num_images == 6 and faces.num_identities == 3
    assert faces.identity_ranges.tolist() == [[1, 4], [4, 6], [6, 7]]
    assert [faces[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 2]
    for i, rel in enumerate(order):
        image = faces.image_bytes(i)
        if rel.lower().endswith((".jpg", ".jpeg")):
            assert image == files[rel]  # JPEGs are stored untouched
        else:
            assert image.startswith(b"\xff\xd8\xff")  # re-encoded to JPEG
            original = cv2.imdecode(np.frombuffer(files[rel], np.uint8), cv2.IMREAD_COLOR)
            decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape == original.shape and np.abs(decoded.astype(int) - original).max() <= 3
    assert faces.header(0).id == 1 and faces.records.read(7)[:4] == struct.pack("<I", 2)  # identity flag 2


def test_pack_folder_real_faces(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for person in sorted((shared_data / "celeba_aligned112").iterdir())[:4]:
        shutil.copytree(person, src / person.name)
    pack_folder(src, tmp_path / "celeba")
    faces = RecordIOFaceSet(tmp_path / "celeba.rec")
    paths = sorted(src.glob("*/*.jpg"))
    assert faces.num_images == len(paths) and faces.num_identities == 4
    for i, path in enumerate(paths):
        assert faces.image_bytes(i) == path.read_bytes()
        first, end = faces.identity_ranges[faces.label(i)]
        assert first <= faces.key(i) < end


def test_pack_folder_layout_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_id" / "a").mkdir(parents=True)
    (tmp_path / "empty_id" / "b").mkdir()
    (tmp_path / "empty_id" / "b" / "1.jpg").write_bytes(synthetic_jpeg(0, size=112))
    with pytest.raises(FolderLayoutError, match=r"empty_id: 1 identity folder\(s\) without images: a;"):
        pack_folder(tmp_path / "empty_id", tmp_path / "o1")
    skipped = pack_folder(tmp_path / "empty_id", tmp_path / "o0", allow_empty=True)
    assert (skipped["images"], skipped["identities"]) == (1, 1)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "face.jpg").write_bytes(synthetic_jpeg(0))
    with pytest.raises(FolderLayoutError, match=r"loose: images directly under the root \(face\.jpg"):
        pack_folder(tmp_path / "loose", tmp_path / "o2")
    (tmp_path / "bad" / "p").mkdir(parents=True)
    (tmp_path / "bad" / "p" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with pytest.raises(DecodeError, match=r"bad/p/broken\.png: corrupt or truncated PNG"):
        pack_folder(tmp_path / "bad", tmp_path / "o3")
    assert sorted(p.name for p in tmp_path.glob("o*")) == [
        "o0.idx",
        "o0.lst",
        "o0.rec",
    ]  # nothing half-written


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def test_pickle_does_not_carry_the_mmap() -> None:
    faces = RecordIOFaceSet(FIXTURES / "insightface.rec")
    first = faces[0]  # opens the mmap
    assert faces.records._mm is not None
    clone = pickle.loads(pickle.dumps(faces))
    assert clone.records._mm is None
    assert clone[0] == first and clone[7] == faces[7]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(context: str) -> None:
    faces = RecordIOFaceSet(FIXTURES / "insightface.rec")
    expected = [faces[i] for i in range(len(faces))]  # parent has an open mmap before the workers start
    loader = torch.utils.data.DataLoader(
        faces, batch_size=None, num_workers=2, multiprocessing_context=context
    )
    assert [(bytes(img), int(lab)) for img, lab in loader] == expected


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_corrupt_magic(tmp_path: Path) -> None:
    rec = copy_fixture("insightface", tmp_path)
    offset = IndexedRecordIO(rec).offset(3)
    with rec.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"JUNK")
    faces = RecordIOFaceSet(rec)
    assert faces[1][1] == 0  # neighbours still read
    with pytest.raises(RecordIOError, match=rf"insightface\.rec: key 3 at offset {offset}: bad magic number"):
        faces[2]


def test_truncated_record(tmp_path: Path) -> None:
    rec = copy_fixture("im2rec", tmp_path)
    offset = IndexedRecordIO(rec).offset(5)  # the last record
    with rec.open("r+b") as fh:
        fh.truncate(offset + 100)
    faces = RecordIOFaceSet(rec)
    assert faces.label(4) == 1
    for read in (faces.image_bytes, faces.label):  # even the intact header is not trusted
        with pytest.raises(RecordIOError, match=rf"im2rec\.rec: key 5 at offset {offset}: truncated record"):
            read(5)


def test_truncated_multipart_record(tmp_path: Path) -> None:
    rec = copy_fixture("chunks", tmp_path)
    offset = IndexedRecordIO(rec).offset(7)
    with rec.open("r+b") as fh:
        fh.truncate(offset + 8 + 768)  # the first part is whole, the last part's header is gone
    with pytest.raises(RecordIOError, match=rf"chunks\.rec: key 7 at offset {offset}: truncated record"):
        IndexedRecordIO(rec).read(7)


def test_idx_offset_past_end(tmp_path: Path) -> None:
    rec = copy_fixture("insightface", tmp_path)
    idx = tmp_path / "insightface.idx"
    lines = idx.read_text().splitlines()
    lines[5] = "5\t999999996"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        RecordIOError, match=r"insightface\.idx: line 6: key 5: offset 999999996 is past the end of"
    ):
        RecordIOFaceSet(rec)


def test_idx_offset_into_a_record_part(tmp_path: Path) -> None:
    rec = copy_fixture("chunks", tmp_path)
    idx = tmp_path / "chunks.idx"
    offset = IndexedRecordIO(rec).offset(3) + 12  # the header of key 3's second (middle) part
    idx.write_text(idx.read_text().replace(f"3\t{offset - 12}", f"3\t{offset}"))
    with pytest.raises(RecordIOError, match=rf"key 3 at offset {offset}: the offset points into the middle"):
        IndexedRecordIO(rec).read(3)


def test_non_integer_label(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path / "l.rec") as writer:
        writer.write(0, pack(0, synthetic_jpeg(0)))
        writer.write(1, pack(3.5, synthetic_jpeg(1)))
        writer.write(2, pack([float("nan"), 1.0], synthetic_jpeg(2)))
    faces = RecordIOFaceSet(tmp_path / "l.rec")
    assert faces.label(0) == 0
    with pytest.raises(RecordLabelError, match=r"l\.rec: key 1: label 3\.5 is not a non-negative integer"):
        faces[1]
    with pytest.raises(RecordLabelError, match=r"l\.rec: key 2: label nan is not"):
        faces.label(2)


def test_missing_idx(tmp_path: Path) -> None:
    rec = copy_fixture("insightface", tmp_path)
    (tmp_path / "insightface.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"index file .*insightface\.idx is missing") as err:
        RecordIOFaceSet(rec)
    assert err.value.filename == str(tmp_path / "insightface.idx")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("4\t48\t7", r"line 5: expected 'key<TAB>offset', got b'4\\t48\\t7' \(3 fields\)"),
        ("four\t48", r"line 5: key and offset must be integers, got b'four\\t48'"),
        ("4\t-8", r"line 5: key 4 has negative offset -8"),
        ("3\t48", r"key 3 appears more than once \(lines \[4, 5\]\)"),
    ],
)
def test_malformed_idx_line(tmp_path: Path, line: str, message: str) -> None:
    rec = copy_fixture("chunks", tmp_path)
    idx = tmp_path / "chunks.idx"
    lines = idx.read_text().splitlines()
    lines[4] = line
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"chunks\.idx: " + message):
        IndexedRecordIO(rec)


def test_header_lists_a_key_the_index_lacks(tmp_path: Path) -> None:
    rec = copy_fixture("insightface", tmp_path)
    idx = tmp_path / "insightface.idx"
    idx.write_text("".join(ln + "\n" for ln in idx.read_text().splitlines() if not ln.startswith("10\t")))
    faces = RecordIOFaceSet(rec)  # image keys are all there
    with pytest.raises(
        RecordIOError, match=r"insightface\.rec: key 10 \(identity record of class 1\).*no key 10"
    ):
        faces.identity_ranges  # noqa: B018


def test_labels_shorter_than_flag(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path / "f.rec") as writer:
        writer.write(0, struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8)  # flag 5 needs 20 label bytes
    with pytest.raises(
        RecordIOError, match=r"f\.rec: key 0 \(meta header\): header flag 5 announces 5 labels"
    ):
        RecordIOFaceSet(tmp_path / "f.rec")


@pytest.mark.parametrize("name", ["insightface", "im2rec", "chunks"])
def test_scan_finds_nothing_wrong_in_files_written_by_mxnet(name: str) -> None:
    with IndexedRecordIO(FIXTURES / f"{name}.rec") as rio:
        assert rio.scan() == []


def test_scan_reports_every_damaged_record_as_a_read_would(tmp_path: Path) -> None:
    rec = copy_fixture("chunks", tmp_path)  # keys 0..7, multi-part records among them
    rio = IndexedRecordIO(rec)
    offsets = {int(k): rio.offset(int(k)) for k in rio.keys}
    with rec.open("r+b") as fh:
        fh.seek(offsets[1])
        fh.write(b"JUNK")  # bad magic
        fh.seek(offsets[4] + 4)
        fh.write(struct.pack("<I", offsets[5] - offsets[4]))  # a whole record's length runs into key 5
        fh.truncate(offsets[7] + 8 + 768)  # key 7, multi-part: its later parts are cut off
    idx = tmp_path / "chunks.idx"
    idx.write_text(idx.read_text().replace(f"6\t{offsets[6]}", "6\t999999996"))  # past the end
    with pytest.raises(RecordIOError, match="key 6: offset 999999996 is past the end"):
        IndexedRecordIO(rec)  # the reader refuses the index at the first bad offset
    rio = IndexedRecordIO(rec, check_offsets=False)
    problems = dict(rio.scan())
    assert sorted(problems) == [1, 4, 6, 7]
    for key in (1, 7):  # worded exactly as reading the record says it
        with pytest.raises(RecordIOError) as err:
            rio.read(key)
        assert problems[key] == str(err.value)
    assert "bad magic number" in problems[1] and "truncated record" in problems[7]
    assert problems[4].endswith(f"runs past the start of key 5 at offset {offsets[5]}")
    assert problems[6].startswith(f"{idx}: line 7: key 6: offset 999999996 is past the end")
    assert rio.read(5) == IndexedRecordIO(FIXTURES / "chunks.rec").read(5)  # the others are whole


def test_identity_table_of_mxnet_files_agrees_with_their_labels() -> None:
    for name in ("insightface", "im2rec"):
        faces = RecordIOFaceSet(FIXTURES / f"{name}.rec")
        assert faces.identity_problems(faces.labels()) == [], name


def test_identity_table_that_disagrees_with_the_labels(tmp_path: Path) -> None:
    """Three classes of two images (keys 1-6, identity records 7-9), damaged one way at a time."""
    jpeg = synthetic_jpeg(0)

    def write(name: str, meta=(7, 10), ranges=((1, 3), (3, 5), (5, 7)), labels=(0, 0, 1, 1, 2, 2)):
        with RecordIOWriter(tmp_path / f"{name}.rec") as writer:
            writer.write(0, pack(list(meta), b""))
            for key, label in enumerate(labels, start=1):
                writer.write(key, pack(float(label), jpeg, id=key))
            for key, first_end in enumerate(ranges, start=7):
                writer.write(key, pack(list(first_end), b"", id=key))
        faces = RecordIOFaceSet(tmp_path / f"{name}.rec")
        return faces.identity_problems(faces.labels())

    assert write("good") == []
    (problem,) = write("phantom", meta=(7, 12))
    assert problem.endswith(
        "announces 5 identities (keys 7..11), but 2 of their records are not in the index (keys 10, 11)"
    )
    (problem,) = write("empty", ranges=((1, 3), (3, 3), (3, 7)), labels=(0, 0, 2, 2, 2, 2))
    assert "key 8 (identity record of class 1): empty range [3, 3)" in problem
    (problem,) = write("overlap", ranges=((1, 4), (3, 5), (5, 7)))  # key 3 in classes 0 and 1
    assert "key 8 (identity record of class 1): range [3, 5) should start at key 4" in problem
    short = write("short", ranges=((1, 3), (3, 5), (5, 6)))
    assert short[0].endswith(
        "the identity records cover image keys 1..5, the meta header announces images up to key 6"
    )
    assert short[1].endswith("key 6: label 2, but no identity record holds it") and len(short) == 2
    (problem,) = write("mislabelled", labels=(0, 0, 1, 2, 2, 2))
    assert problem.endswith(
        "key 4: label 2, but it lies in [3, 5), the range of class 1 (identity record key 8)"
    )
    faces = RecordIOFaceSet(tmp_path / "mislabelled.rec")  # a label that could not be read is left out
    assert faces.identity_problems(np.array([0, 0, 1, -1, 2, 2])) == []


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_info_and_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(FIXTURES / "insightface.rec")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("images", "identities", "header", "records")} == {
        "images": 8,
        "identities": 3,
        "header": True,
        "records": 12,
    }
    assert out["size"] == (FIXTURES / "insightface.rec").stat().st_size
    make_folder(tmp_path / "imgs")
    assert main(["pack", str(tmp_path / "imgs"), str(tmp_path / "t"), "--image-size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    (tmp_path / "t.idx").unlink()
    assert main(["info", str(tmp_path / "t.rec")]) == 1
    assert "t.idx is missing" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "size", "images"), [("insightface", 112, 8), ("im2rec", 56, 6)])
def test_cli_check_passes_files_written_by_mxnet(
    name, size, images, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = str(FIXTURES / f"{name}.rec")
    assert main(["check", rec, "--workers", "1", "--image-size", str(size)]) == 0
    out = capsys.readouterr()
    assert (json.loads(out.out)["images"], json.loads(out.out)["identities"], out.err) == (images, 3, "")
    assert main(["check", rec, "--workers", "1", "--image-size", str(2 * size)]) == 1  # the size is checked
    assert f"{images} problems; the first: {rec} key" in capsys.readouterr().err


def test_cli_module_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "data.recordio", "info", str(FIXTURES / "im2rec.rec")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(done.stdout)
    assert (out["header"], out["images"], out["identities"]) == (False, 6, 3)


def test_bench_data_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.bench_data import main as bench_main

    report = bench_main(["--images", "300", "--reads", "600", "--workers", "0", "--json"])
    assert report["random_reads"]["reads"] == 600 and report["random_reads"]["records_per_s"] > 0
    assert report["loader"][0]["images"] == 300
    assert json.loads(capsys.readouterr().out)["images"] == 300
