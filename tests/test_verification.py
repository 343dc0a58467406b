from __future__ import annotations

import json
import os
import pickle
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
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(bins[5], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(real_lfw.images[5].transpose(1, 2, 0).astype(int) - ref).max() <= 2


def test_round_trip(tmp_path):
    jpegs = [encode_jpeg(face(i)) for i in range(6)]
    write_bin(tmp_path / "x.bin", jpegs, [True, False, True])
    bins, issame = read_bin_raw(tmp_path / "x.bin")
    assert bins == jpegs
    assert issame.tolist() == [True, False, True]
    loaded = load_bin(tmp_path / "x.bin")
    assert loaded.images.shape == (6, 3, 112, 112)
    assert np.abs(loaded.images[3].transpose(1, 2, 0).astype(int) - face(3)).mean() < 3


def test_python2_style_pickle_and_numpy_issame(tmp_path):
    # protocol 2 under Python 3 writes bytes through _codecs.encode; numpy bool arrays use _reconstruct
    jpegs = [encode_jpeg(face(i)) for i in range(4)]
    path = tmp_path / "py2.bin"
    path.write_bytes(pickle.dumps((jpegs, np.array([True, False])), protocol=2))
    bins, issame = read_bin_raw(path)
    assert bins == jpegs and issame.tolist() == [True, False]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Payload(marker), b"x"], [True])))
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
        (([b"a", b"b"], [1]), "issame must be a flat list of booleans"),
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
    (tmp_path / "pairs.txt").write_text("\n".join([lines[1], lines[2], lines[301], lines[302]]) + "\n")
    summary = make_bin(
        shared_data / "lfw_color150", tmp_path / "pairs.txt", tmp_path / "lfw4.bin", resize=True
    )
    assert summary["pairs"] == 4 and summary["same"] == 2
    loaded = load_bin(tmp_path / "lfw4.bin")
    assert loaded.issame.tolist() == [True, True, False, False]


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
    assert (out["pairs"], out["same"], out["images"], out["shape"]) == (4, 2, 8, [112, 112, 3])
    assert main(["info", str(tmp_path / "missing.bin")]) == 1
    assert "missing.bin" in capsys.readouterr().err
