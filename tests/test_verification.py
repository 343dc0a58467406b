from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.decode import encode_jpeg
from data.verification import (
    VerificationFileError,
    load_bin,
    main,
    make_bin,
    read_bin_raw,
    read_pairs,
    write_bin,
)

ROOT = Path(__file__).resolve().parent.parent


def face(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.resize(
        rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
    )
    return img


@pytest.fixture(scope="module")
def real_lfw(shared_data):
    return load_bin(shared_data / "lfw_yunet112.bin")


def test_real_lfw_bin(real_lfw):
    assert real_lfw.pairs == 6000
    assert int(real_lfw.issame.sum()) == 3000
    assert real_lfw.images.shape == (12000, 3, 112, 112) and real_lfw.images.dtype == np.uint8
    # LFW View 2 order: each fold is 300 same pairs then 300 different ones
    assert real_lfw.issame[:300].all() and not real_lfw.issame[300:600].any()


def test_real_lfw_pixels_match_opencv(shared_data, real_lfw):
    bins, _ = read_bin_raw(shared_data / "lfw_yunet112.bin")
    # images used by several pairs are decoded once and copied: check a reused one as well as others
    reused = next(i for i in range(1, len(bins)) if any(bins[i] is bins[j] for j in range(i)))
    for i in (0, 5, 6001, len(bins) - 1, reused):
        ref = cv2.imdecode(np.frombuffer(bins[i], np.uint8), cv2.IMREAD_COLOR)
        ref = cv2.cvtColor(ref, cv2.COLOR_BGR2RGB)
        assert np.abs(real_lfw.images[i].transpose(1, 2, 0).astype(int) - ref).max() <= 2, i


def test_written_protocol_matches_the_real_file(shared_data, tmp_path):
    real = (shared_data / "lfw_yunet112.bin").read_bytes()[:2]
    write_bin(tmp_path / "x.bin", [b"a", b"b"], [True])
    assert real == b"\x80\x04"  # PROTO 4
    assert (tmp_path / "x.bin").read_bytes()[:2] == real


def test_round_trip(tmp_path):
    jpegs = [encode_jpeg(face(i)) for i in range(6)]
    jpegs[4] = jpegs[1]  # one image in two pairs
    write_bin(tmp_path / "x.bin", jpegs, [True, False, True])
    bins, issame = read_bin_raw(tmp_path / "x.bin")
    assert bins == jpegs
    assert bins[4] is bins[1]  # stored once, shared on reading
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    loaded = load_bin(tmp_path / "x.bin")
    assert loaded.name == "x" and loaded.pairs == 3
    assert loaded.images.shape == (6, 3, 112, 112) and loaded.images.dtype == np.uint8
    for i, seed in enumerate([0, 1, 2, 3, 1, 5]):
        assert np.abs(loaded.images[i].transpose(1, 2, 0).astype(int) - face(seed)).mean() < 3, i


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes: str images as BINSTRING."""
    out = [b"\x80\x02]("]  # PROTO 2, EMPTY_LIST, MARK
    out += [b"T" + struct.pack("<I", len(img)) + img for img in images]
    out += [b"e]("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if flag else b"\x89" for flag in issame]  # NEWTRUE / NEWFALSE
    out += [b"e\x86."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_python2_pickle(tmp_path):
    jpegs = [encode_jpeg(face(i)) for i in range(4)]
    data = python2_pickle(jpegs, [True, False])
    # plain Python 3 unpickling (ASCII) cannot even read these: encoding="bytes" is what makes them load
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)
    (tmp_path / "py2.bin").write_bytes(data)
    bins, issame = read_bin_raw(tmp_path / "py2.bin")
    assert bins == jpegs and issame.tolist() == [True, False]
    assert load_bin(tmp_path / "py2.bin").images.shape == (4, 3, 112, 112)


@pytest.mark.parametrize(
    "issame",
    [np.array([True, False]), [np.True_, np.False_], (True, False)],
    ids=["numpy-array", "numpy-scalars", "tuple"],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_other_issame_layouts(tmp_path, issame, protocol):
    # protocol 2 under Python 3 writes bytes through _codecs.encode; numpy bools use numpy globals
    jpegs = [encode_jpeg(face(i)) for i in range(4)]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((jpegs, issame), protocol=protocol))
    bins, flags = read_bin_raw(path)
    assert bins == jpegs and flags.dtype == bool and flags.tolist() == [True, False]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["image", "issame", "top"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    payload = Payload(marker)
    obj = {
        "image": ([payload, b"x"], [True]),
        "issame": ([b"x", b"y"], [payload]),
        "top": payload,
    }[where]
    path.write_bytes(pickle.dumps(obj))
    # the payload does run under plain pickle: the test would notice if it could not
    with pytest.raises(VerificationFileError, match=r"evil\.bin: refused to load global (posix|os)\.system"):
        read_bin_raw(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (([b"a", b"b"], [True], "extra"), "got a 3-tuple"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", "text"], [True]), "image 1 is str"),
        (([b"a", b"b"], [1]), r"issame\[0\] is int 1"),
        (([b"a", b"b", b"c", b"d"], [True, "yes"]), r"issame\[1\] is str"),
        (([b"a", b"b"], np.array([1])), "issame must be a flat bool array, got int64"),
        (([b"a", b"b"], "ab"), "issame must be a flat list of booleans, got str"),
        (([], []), "holds no pairs"),
        ((b"ab", [True]), "bins must be a list of image bytes, got bytes"),
        ({"bins": []}, "got dict"),
    ],
)
def test_malformed_structure_names_file_and_item(tmp_path, obj, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(VerificationFileError, match=message) as err:
        read_bin_raw(path)
    assert str(path) in str(err.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.bin"
    write_bin(path, [encode_jpeg(face(i)) for i in range(2)], [True])
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(VerificationFileError, match=r"cut\.bin: not a readable verification pickle"):
        read_bin_raw(path)


def test_undecodable_image_names_its_index(tmp_path):
    path = tmp_path / "x.bin"
    write_bin(path, [encode_jpeg(face(0)), b"\xff\xd8 not a jpeg"], [False])
    with pytest.raises(ValueError, match=r"x\.bin image 1"):
        load_bin(path)


def test_write_is_atomic(tmp_path):
    path = tmp_path / "x.bin"
    write_bin(path, [b"a", b"b"], [True])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="need 2 per pair"):
        write_bin(path, [b"a"], [True])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


PAIRS = """2\t2
Alice\t1\t2
Bob\t1\t3
Alice\t1\tBob\t2
Carol\t1\tBob\t1
"""


def write_people(root: Path, flat: bool) -> dict[str, bytes]:
    files = {}
    for seed, (name, num) in enumerate(
        [("Alice", 1), ("Alice", 2), ("Bob", 1), ("Bob", 2), ("Bob", 3), ("Carol", 1)]
    ):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{num:04d}.jpg"
        path.write_bytes(encode_jpeg(face(seed)))
        files[f"{name}{num}"] = path.read_bytes()
    return files


def test_real_bin_is_pickled_without_globals(shared_data):
    # the restricted unpickler must not need any global for the real file: none is referenced
    ops = {op.name for op, _, _ in pickletools.genops((shared_data / "lfw_yunet112.bin").read_bytes())}
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


@pytest.mark.parametrize("flat", [False, True])
def test_make_bin_follows_the_pairs_file(tmp_path, flat):
    files = write_people(tmp_path / "img", flat)
    (tmp_path / "pairs.txt").write_text(PAIRS)
    summary = make_bin(tmp_path / "img", tmp_path / "pairs.txt", tmp_path / "out.bin")
    assert summary["pairs"] == 4 and summary["same"] == 2
    bins, issame = read_bin_raw(tmp_path / "out.bin")
    assert issame.tolist() == [True, True, False, False]
    expected = ["Alice1", "Alice2", "Bob1", "Bob3", "Alice1", "Bob2", "Carol1", "Bob1"]
    assert bins == [files[k] for k in expected]  # stored byte for byte, in pair order


def test_make_bin_missing_image_names_line_and_paths(tmp_path):
    write_people(tmp_path / "img", flat=False)
    (tmp_path / "pairs.txt").write_text("Alice 1 2\nDave 1 2\n")
    with pytest.raises(VerificationFileError, match=r"pairs\.txt:2: image not found: tried .*Dave_0001\.jpg"):
        make_bin(tmp_path / "img", tmp_path / "pairs.txt", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_malformed_pairs_line(tmp_path):
    (tmp_path / "pairs.txt").write_text("Alice 1 2\nAlice one 2\n")
    with pytest.raises(VerificationFileError, match=r"pairs\.txt:2: expected 'name n1 n2'"):
        read_pairs(tmp_path / "pairs.txt")


def test_make_bin_refuses_unaligned_sizes_unless_resize(tmp_path):
    (tmp_path / "img" / "Eve").mkdir(parents=True)
    for n in (1, 2):
        (tmp_path / "img" / "Eve" / f"Eve_{n:04d}.jpg").write_bytes(encode_jpeg(face(n, size=150)))
    (tmp_path / "pairs.txt").write_text("Eve 1 2\n")
    with pytest.raises(VerificationFileError, match="150x150 image, expected an aligned 112x112"):
        make_bin(tmp_path / "img", tmp_path / "pairs.txt", tmp_path / "out.bin")
    make_bin(tmp_path / "img", tmp_path / "pairs.txt", tmp_path / "out.bin", resize=True)
    assert load_bin(tmp_path / "out.bin").images.shape == (2, 3, 112, 112)


def test_make_bin_on_real_lfw_pairs(shared_data, tmp_path):
    lines = (shared_data / "lfw_pairs.txt").read_text().splitlines()
    chosen = [lines[0], lines[1], lines[2], lines[301], lines[302]]  # header, 2 same, 2 different
    (tmp_path / "pairs.txt").write_text("\n".join(chosen) + "\n")
    root = shared_data / "lfw_color150"
    with pytest.raises(VerificationFileError, match="150x150 image, expected an aligned 112x112"):
        make_bin(root, tmp_path / "pairs.txt", tmp_path / "lfw4.bin")
    summary = make_bin(root, tmp_path / "pairs.txt", tmp_path / "lfw4.bin", resize=True)
    assert summary["pairs"] == 4 and summary["same"] == 2
    loaded = load_bin(tmp_path / "lfw4.bin")
    assert loaded.issame.tolist() == [True, True, False, False]
    assert loaded.images.shape == (8, 3, 112, 112)
    # pair order and content: each stored image is the INTER_AREA reduction of the named photo
    f = chosen[3].split()  # different pair: name1 n1 name2 n2
    for k, (name, num) in enumerate([(f[0], int(f[1])), (f[2], int(f[3]))]):
        src = cv2.cvtColor(cv2.imread(str(root / f"{name}_{num:04d}.jpg")), cv2.COLOR_BGR2RGB)
        ref = cv2.resize(src, (112, 112), interpolation=cv2.INTER_AREA)
        assert np.abs(loaded.images[4 + k].transpose(1, 2, 0).astype(int) - ref).mean() < 2


def test_make_bin_encodes_non_jpeg_images(tmp_path):
    (tmp_path / "img").mkdir()
    for n in (1, 2):  # PNG content under the .jpg name LFW layouts use
        cv2.imwrite(str(tmp_path / "img" / f"Pat_{n:04d}.png"), face(n))
        (tmp_path / "img" / f"Pat_{n:04d}.png").rename(tmp_path / "img" / f"Pat_{n:04d}.jpg")
    (tmp_path / "pairs.txt").write_text("Pat 1 2\n")
    make_bin(tmp_path / "img", tmp_path / "pairs.txt", tmp_path / "out.bin")
    bins, _ = read_bin_raw(tmp_path / "out.bin")
    assert all(b[:3] == b"\xff\xd8\xff" for b in bins)


def test_cli_info_and_make(tmp_path, capsys):
    write_people(tmp_path / "img", flat=True)
    (tmp_path / "pairs.txt").write_text(PAIRS)
    assert main(["make", str(tmp_path / "img"), str(tmp_path / "pairs.txt"), str(tmp_path / "o.bin")]) == 0
    capsys.readouterr()
    proc = subprocess.run(
        [sys.executable, "-m", "data.verification", "info", str(tmp_path / "o.bin")],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    assert (out["pairs"], out["same"], out["images"], out["shape"]) == (4, 2, 8, [8, 3, 112, 112])
    assert main(["info", str(tmp_path / "missing.bin")]) == 1
    assert "missing.bin" in capsys.readouterr().err
