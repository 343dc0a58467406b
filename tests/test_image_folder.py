from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.image_folder import FolderLayoutError, ImageFolderFaces


def touch_images(root: Path, layout: dict[str, list[str]]) -> None:
    for identity, files in layout.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for f in files:
            (root / identity / f).write_bytes(f"{identity}/{f}".encode())


def test_identities_sorted_to_contiguous_labels(tmp_path):
    touch_images(tmp_path, {"zed": ["b.jpg", "a.JPG"], "amy": ["1.png"], "bob": ["x.jpg", "notes.txt"]})
    faces = ImageFolderFaces(tmp_path)
    assert faces.classes == ["amy", "bob", "zed"]
    assert (faces.num_identities, faces.num_images, len(faces)) == (3, 4, 4)
    assert faces.identity_ranges.tolist() == [[0, 1], [1, 2], [2, 4]]
    assert faces.labels().tolist() == [0, 1, 2, 2]
    assert faces[2] == (b"zed/a.JPG", 2)  # sorted by file name within the identity
    assert faces[3] == (b"zed/b.jpg", 2)
    assert [p.name for p in faces.ignored] == ["notes.txt"]


def test_errors(tmp_path):
    with pytest.raises(FolderLayoutError, match="image folder not found"):
        ImageFolderFaces(tmp_path / "nope")
    with pytest.raises(FolderLayoutError, match="no identity folders with images"):
        ImageFolderFaces(tmp_path)
    touch_images(tmp_path, {"amy": ["1.jpg"]})
    (tmp_path / "empty_one").mkdir()
    with pytest.raises(FolderLayoutError, match=r"1 identity folder.* without images: empty_one"):
        ImageFolderFaces(tmp_path)
    faces = ImageFolderFaces(tmp_path, allow_empty=True)
    assert faces.classes == ["amy"] and faces.empty_identities == ["empty_one"]
    with pytest.raises(IndexError, match="image index 1 out of range"):
        faces[1]
    (tmp_path / "loose.jpg").write_bytes(b"x")
    with pytest.raises(FolderLayoutError, match="images directly under the root"):
        ImageFolderFaces(tmp_path, allow_empty=True)


def test_real_celeba_folder(shared_data):
    root = shared_data / "celeba_aligned112"
    faces = ImageFolderFaces(root)
    assert faces.num_identities == 299
    assert faces.num_images == 6283
    ranges = faces.identity_ranges
    assert ranges[0, 0] == 0 and ranges[-1, 1] == 6283 and np.array_equal(ranges[1:, 0], ranges[:-1, 1])
    sizes = ranges[:, 1] - ranges[:, 0]
    assert sizes.min() >= 2 and sizes.max() <= 30
    first_dir = sorted(p for p in root.iterdir() if p.is_dir())[0]
    assert faces.path(0).parent == first_dir
    assert faces[0][0] == sorted(first_dir.iterdir())[0].read_bytes()


def test_packing_training_aligning_and_megaface_see_the_same_images(tmp_path):
    """One list of image suffixes: every format in any case is an image, a text file is not, whoever lists."""
    import cv2

    from data.recordio import RecordIOFaceSet, pack_folder
    from scripts.prepare_dataset import list_photos
    from validation_megaface.protocol import list_facescrub

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    expected = [
        "amy/a_1.jpg", "amy/a_2.JPEG", "bob/b_1.png", "bob/b_2.bmp", "cyd/c_1.webp", "cyd/c_2.jpg",
        "dan/d_1.tiff",
    ]  # fmt: skip
    for rel in expected:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(Path(rel).suffix.lower().replace(".jpeg", ".jpg"), image)
        assert ok
        (root / rel).write_bytes(buf.tobytes())
    (root / "amy" / "notes.txt").write_text("not a face")

    summary = pack_folder(root, tmp_path / "rec" / "train")
    packed = [line.split("\t")[2] for line in (tmp_path / "rec" / "train.lst").read_text().splitlines()]
    training = ImageFolderFaces(root)
    trained = [training.path(i).relative_to(root).as_posix() for i in range(len(training))]
    aligned = [p.relative_to(root).as_posix() for _, p in list_photos(root, flat=False)]
    probes = [p.relative_to(root).as_posix() for p in list_facescrub(root).files]
    assert packed == trained == aligned == probes == expected
    assert [Path(p).name for p in summary["ignored"]] == [p.name for p in training.ignored] == ["notes.txt"]
    assert [p.name for _, p in list_photos(root / "amy", flat=True)] == ["a_1.jpg", "a_2.JPEG"]
    rec = RecordIOFaceSet(tmp_path / "rec" / "train.rec")
    assert rec.labels().tolist() == training.labels().tolist() == [0, 0, 1, 1, 2, 2, 3]
    rec.close()
