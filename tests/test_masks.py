"""Synthetic face masks on real aligned faces, the online augmentation, the offline masking tool and the
masked ArcFace + focal recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.config import AugmentConfig, ConfigError, load_config
from data import masks
from data.decode import decode_rgb, encode_jpeg
from data.image_folder import ImageFolderFaces
from data.recordio import IndexedRecordIO, RecordIOFaceSet, RecordIOWriter, pack, pack_folder, unpack
from data.sampler import KeyedFaceDataset
from data.transforms import FaceDataset, FaceTransform, augment
from data.verification import read_bin_raw, write_bin
from face_alignment.align import ARCFACE_TEMPLATE, similarity_transform
from scripts import mask_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def faces(shared_data: Path) -> list[np.ndarray]:
    """Six real aligned 112x112 CelebA crops of six people."""
    folders = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[::50][:6]
    return [decode_rgb(sorted(f.glob("*.jpg"))[0].read_bytes(), str(f)) for f in folders]


@pytest.fixture(scope="module")
def overlays(shared_data: Path) -> dict[str, np.ndarray]:
    return masks.load_overlays(shared_data / "extras" / "images")


def polygon_mask(poly: np.ndarray, size: int, grow: int) -> np.ndarray:
    """Pixels inside an image-space polygon, grown by ``grow`` pixels (the antialiased edge)."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return cv2.dilate(canvas, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)


def inside(poly: np.ndarray, point: np.ndarray) -> float:
    """Signed distance of ``point`` to the polygon's edge (positive inside)."""
    return cv2.pointPolygonTest(poly.astype(np.float32), (float(point[0]), float(point[1])), True)


def check_mask_placement(img, out, style, landmarks):
    """The mask changes the lower face only: nothing above the line under the eyes, nothing outside its
    footprint polygon (2 px of antialiased edge allowed), and it covers the nose tip and the mouth."""
    changed = np.any(out != img, axis=2)
    frame = masks.FaceFrame.from_landmarks(landmarks)  # the un-jittered frame of the face
    ys, xs = np.mgrid[: img.shape[0], : img.shape[1]]
    v = frame.to_face(np.stack([xs, ys], axis=-1))[..., 1]
    assert not changed[v < masks.UNDER_EYE_V].any(), f"{style.kind}: pixels above the line under the eyes"
    polygons = masks.mask_polygons(style, landmarks)
    outside = changed & ~polygon_mask(polygons["footprint"], img.shape[0], grow=2)
    assert not outside.any(), f"{style.kind}: {outside.sum()} changed pixels outside the mask polygon"
    for point in landmarks[2:]:  # nose tip, mouth corners: well inside the body, and painted over
        assert inside(polygons["body"], point) > 3.0, style.kind
        x, y = np.round(point).astype(int)
        window = np.abs(out[y - 2 : y + 3, x - 2 : x + 3].astype(int) - img[y - 2 : y + 3, x - 2 : x + 3])
        assert changed[y - 2 : y + 3, x - 2 : x + 3].all() and window.mean() > 3, style.kind
    return changed


@pytest.mark.parametrize("kind", masks.MASK_TYPES)
def test_every_type_changes_only_the_lower_face(kind, faces, overlays):
    names = tuple(overlays)
    for i, img in enumerate(faces):
        style = masks.draw_style(np.random.default_rng([i, 1]), kind, overlay_names=names)
        out = masks.render_mask(img, style, overlays=overlays)
        assert out.dtype == np.uint8 and out.shape == img.shape
        changed = check_mask_placement(img, out, style, ARCFACE_TEMPLATE)
        assert changed.mean() > 0.2  # a mask covers a good part of the crop, not a few pixels
        assert np.array_equal(out[:56], img[:56])  # rows over the eyes and just under them are untouched


def test_detected_landmarks_move_the_mask(faces):
    # the face turned by 20 degrees, shrunk and shifted: the mask follows the transformed points
    matrix = cv2.getRotationMatrix2D((56, 56), 20, 0.8)
    matrix[:, 2] += (6, -4)
    img = cv2.warpAffine(faces[0], matrix, (112, 112))
    points = np.c_[ARCFACE_TEMPLATE, np.ones(5)] @ matrix.T
    assert np.allclose(similarity_transform(ARCFACE_TEMPLATE, points), matrix, atol=1e-9)
    for kind in masks.SYNTHETIC_TYPES:
        style = masks.draw_style(np.random.default_rng(3), kind)
        out = masks.render_mask(img, style, landmarks=points)
        check_mask_placement(img, out, style, points)
        assert not np.array_equal(out, masks.render_mask(img, style))  # the template would be elsewhere


def test_same_seed_same_mask(faces, overlays):
    img = faces[1]
    for kind in masks.MASK_TYPES:
        a = masks.add_mask(img, np.random.default_rng(5), kind=kind, overlays=overlays)
        b = masks.add_mask(img, np.random.default_rng(5), kind=kind, overlays=overlays)
        c = masks.add_mask(img, np.random.default_rng(6), kind=kind, overlays=overlays)
        assert np.array_equal(a, b) and not np.array_equal(a, c), kind
    drawn = {masks.draw_style(np.random.default_rng(s)).kind for s in range(40)}
    assert drawn == set(masks.SYNTHETIC_TYPES)  # the default draws every type that needs no pictures


def test_smaller_crops_scale_the_mask(faces):
    small = cv2.resize(faces[2], (56, 56), interpolation=cv2.INTER_AREA)
    style = masks.draw_style(np.random.default_rng(0), "surgical")
    out = masks.render_mask(small, style)
    changed = np.any(out != small, axis=2)
    assert not changed[:28].any() and changed[46, 28]  # under the eyes only; the mouth (46, 28) covered


def test_overlay_pictures_and_bad_inputs(overlays, tmp_path, faces):
    assert sorted(overlays) == ["black", "blue", "green", "white"]
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[1] > p.shape[0] for p in overlays.values())
    with pytest.raises(FileNotFoundError, match="no such folder"):
        masks.load_overlays(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no mask pictures"):
        masks.load_overlays(tmp_path)
    with pytest.raises(ValueError, match="'overlay' type needs mask pictures"):
        masks.draw_style(np.random.default_rng(0), "overlay")
    with pytest.raises(ValueError, match="unknown mask type 'scarf'"):
        masks.draw_style(np.random.default_rng(0), "scarf")
    with pytest.raises(ValueError, match="5 finite landmarks"):
        masks.add_mask(faces[0], np.random.default_rng(0), landmarks=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        masks.add_mask(faces[0].astype(np.float32), np.random.default_rng(0))


# ------------------------------------------------------------------------------------ online augmentation


def test_online_mask_probability_is_respected(faces):
    img, n, p = faces[3], 300, 0.3
    cfg = AugmentConfig(flip=0.0, mask=p)
    masked = sum(not np.array_equal(augment(img, cfg, np.random.default_rng([9, k])), img) for k in range(n))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(masked - n * p) < 4 * sigma, masked
    never = AugmentConfig(flip=0.0, mask=0.0)
    assert all(np.array_equal(augment(img, never, np.random.default_rng([9, k])), img) for k in range(50))


def test_mask_off_leaves_the_other_augmentations_unchanged(faces):
    # p = 0 draws nothing from the stream: existing recipes augment exactly as before
    img = faces[4]
    cfg = AugmentConfig(flip=0.5, crop=0.5, photometric=0.5, low_res=0.5)
    for k in range(20):
        expected = augment(img, cfg, np.random.default_rng(k))
        with_field = augment(img, AugmentConfig(flip=0.5, crop=0.5, photometric=0.5, low_res=0.5, mask=0.0),
                             np.random.default_rng(k))  # fmt: skip
        assert np.array_equal(expected, with_field)


def test_masks_in_training_are_keyed_by_seed_epoch_and_index(faces, tmp_path):
    for k, img in enumerate(faces[:4]):
        folder = tmp_path / f"id{k % 2}"
        folder.mkdir(exist_ok=True)
        (folder / f"{k}.jpg").write_bytes(encode_jpeg(img, quality=95))
    cfg = AugmentConfig(flip=0.0, mask=1.0, mask_types=["cloth", "n95"])
    keyed = KeyedFaceDataset(FaceDataset(ImageFolderFaces(tmp_path), FaceTransform(cfg)), seed=11)
    plain = FaceDataset(ImageFolderFaces(tmp_path), FaceTransform(cfg, train=False))
    first = keyed[(0, 2)][0]
    assert torch.equal(keyed[(0, 2)][0], first)  # same (seed, epoch, index): same mask
    assert not torch.equal(keyed[(1, 2)][0], first)  # another epoch: another mask
    assert not torch.equal(first, plain[2][0])  # masked, unlike the evaluation transform's output
    assert torch.equal(first[:, :56], plain[2][0][:, :56])  # the eyes untouched


def test_mask_options_are_checked_when_the_transform_is_built(shared_data):
    with pytest.raises(ConfigError, match=r"data.augment.mask_types: unknown mask type 'scarf'"):
        FaceTransform(AugmentConfig(mask=0.5, mask_types=["scarf"]))
    with pytest.raises(ConfigError, match=r"set data\.augment\.mask_overlays"):
        FaceTransform(AugmentConfig(mask=0.5, mask_types=["overlay"]))
    with pytest.raises(ConfigError, match=r"data.augment.mask must be a probability"):
        FaceTransform(AugmentConfig(mask=1.5))
    with pytest.raises(ConfigError, match=r"data.augment.mask_overlays: .*no such folder"):
        FaceTransform(AugmentConfig(mask=0.5, mask_types=["overlay"], mask_overlays="/nonexistent/masks"))
    folder = str(shared_data / "extras" / "images")
    FaceTransform(AugmentConfig(mask=0.5, mask_types=["overlay", "surgical"], mask_overlays=folder))
    FaceTransform(AugmentConfig(mask=0.5, mask_types=["scarf"]), train=False)  # evaluation never masks


# ------------------------------------------------------------------------------------------ offline tool


@pytest.fixture()
def celeba_folder(shared_data: Path, tmp_path: Path) -> Path:
    """3 people x 2 real CelebA crops as ``root/<id>/<img>.jpg``, plus a non-image file."""
    root = tmp_path / "faces"
    people = sorted(p for p in (shared_data / "celeba_aligned112").iterdir() if p.is_dir())[10:13]
    for person in people:
        (root / person.name).mkdir(parents=True)
        for image in sorted(person.glob("*.jpg"))[:2]:
            (root / person.name / image.name).write_bytes(image.read_bytes())
    (root / "labels.txt").write_text("kept as it is\n")
    return root


def lower_face_change(a: bytes, b: bytes) -> tuple[float, float]:
    """Mean absolute change above the eyes' line and on the mouth and chin."""
    x, y = decode_rgb(a).astype(int), decode_rgb(b).astype(int)
    return float(np.abs(x[:50] - y[:50]).mean()), float(np.abs(x[80:105, 35:77] - y[80:105, 35:77]).mean())


def run_tool(capsys, *argv: str) -> tuple[int, dict | str]:
    status = mask_dataset.main([*argv, "--quiet"])
    out = capsys.readouterr()
    return status, (json.loads(out.out) if status == 0 else out.err)


def test_masked_recordio_keeps_keys_headers_and_labels(celeba_folder, tmp_path, capsys):
    pack_folder(celeba_folder, tmp_path / "train")  # meta record 0, images 1..6, identity records 7..9
    status, summary = run_tool(
        capsys, str(tmp_path / "train.rec"), str(tmp_path / "masked.rec"), "--seed", "3"
    )
    assert status == 0, summary
    assert summary["images"] == 6 and summary["records"] == 10 and sum(summary["masked"].values()) == 6
    src, dst = IndexedRecordIO(tmp_path / "train.rec"), IndexedRecordIO(tmp_path / "masked.rec")
    assert src.keys.tolist() == dst.keys.tolist()
    for key, payload in src:
        copy = dst.read(key)
        if not 1 <= key <= 6:
            assert copy == payload  # meta header and identity records unchanged
            continue
        (header, image), (header2, image2) = unpack(payload), unpack(copy)
        assert header == header2 and copy[:24] == payload[:24]
        above, below = lower_face_change(image, image2)
        assert above < 2.0 and below > 15.0, (key, above, below)  # JPEG noise above, a mask below
    a, b = RecordIOFaceSet(tmp_path / "train.rec"), RecordIOFaceSet(tmp_path / "masked.rec")
    assert b.has_header and len(a) == len(b) == 6
    assert np.array_equal(a.labels(), b.labels()) and np.array_equal(a.identity_ranges, b.identity_ranges)
    # an existing target is refused; --prob 0.5 leaves some images byte for byte
    status, err = run_tool(capsys, str(tmp_path / "train.rec"), str(tmp_path / "masked.rec"))
    assert status == 1 and "masked.rec exists; pass --overwrite" in err
    status, summary = run_tool(
        capsys, str(tmp_path / "train"), str(tmp_path / "half"), "--prob", "0.5", "--seed", "0"
    )
    assert status == 0 and summary["rec"] == str(tmp_path / "half.rec")
    half = IndexedRecordIO(tmp_path / "half.rec")
    same = sum(half.read(k) == src.read(k) for k in range(1, 7))
    assert same == summary["masked"]["unmasked"] and 0 < same < 6


def test_masked_recordio_without_header_keeps_label_arrays(celeba_folder, tmp_path, capsys):
    jpegs = [p.read_bytes() for p in sorted(celeba_folder.glob("*/*.jpg"))[:3]]
    with RecordIOWriter(tmp_path / "im2rec.rec") as writer:  # im2rec layout: every record an image
        writer.write(0, pack(0.0, jpegs[0], id=0))
        writer.write(1, pack([2.0, 7.5], jpegs[1], id=1, id2=9))
        writer.write(5, pack(1.0, jpegs[2], id=5))
    status, summary = run_tool(
        capsys, str(tmp_path / "im2rec.rec"), str(tmp_path / "out.rec"), "--types", "cloth"
    )
    assert status == 0 and summary["masked"] == {"cloth": 3}
    src, dst = IndexedRecordIO(tmp_path / "im2rec.rec"), IndexedRecordIO(tmp_path / "out.rec")
    for key in (0, 1, 5):
        (h, image), (h2, image2) = unpack(src.read(key)), unpack(dst.read(key))
        assert h == h2 and lower_face_change(image, image2)[1] > 15.0
    assert unpack(dst.read(1))[0].label == (2.0, 7.5)


def test_masked_verification_bin_one_or_both_faces(celeba_folder, tmp_path, capsys):
    jpegs = [p.read_bytes() for p in sorted(celeba_folder.glob("*/*.jpg"))]
    write_bin(tmp_path / "pairs.bin", jpegs, [True, False, True])
    status, summary = run_tool(
        capsys, str(tmp_path / "pairs.bin"), str(tmp_path / "one.bin"), "--pairs", "one"
    )
    assert status == 0 and summary["pairs"] == 3
    bins, issame = read_bin_raw(tmp_path / "one.bin")
    assert issame.tolist() == [True, False, True]
    assert all(bins[i] == jpegs[i] for i in (0, 2, 4))  # the reference faces stay as they were
    assert all(lower_face_change(jpegs[i], bins[i])[1] > 15.0 for i in (1, 3, 5))
    status, _ = run_tool(capsys, str(tmp_path / "pairs.bin"), str(tmp_path / "both.bin"), "--pairs", "both")
    both, _ = read_bin_raw(tmp_path / "both.bin")
    assert status == 0 and all(lower_face_change(j, b)[1] > 15.0 for j, b in zip(jpegs, both, strict=True))
    assert both[1] == bins[1]  # the probe's mask depends on (seed, position) only


def test_masked_image_folder_is_written_whole_or_not_at_all(celeba_folder, tmp_path, capsys):
    status, summary = run_tool(capsys, str(celeba_folder), str(tmp_path / "masked"), "--seed", "2")
    assert status == 0 and summary["images"] == 6 and summary["files"] == 7
    files = sorted(p.relative_to(celeba_folder) for p in celeba_folder.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "masked") for p in (tmp_path / "masked").rglob("*") if p.is_file()
    )
    assert (tmp_path / "masked" / "labels.txt").read_text() == "kept as it is\n"
    for rel in files[:-1]:
        assert (
            lower_face_change((celeba_folder / rel).read_bytes(), (tmp_path / "masked" / rel).read_bytes())[1]
            > 15
        )
    status, err = run_tool(capsys, str(celeba_folder), str(tmp_path / "masked"))
    assert status == 1 and "exists; pass --overwrite" in err
    bad = sorted(celeba_folder.glob("*/*.jpg"))[-1]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: the run fails and leaves nothing behind
    status, err = run_tool(capsys, str(celeba_folder), str(tmp_path / "again"))
    assert status == 1 and str(bad) in err and "JPEG" in err
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))
    status, err = run_tool(capsys, str(celeba_folder), str(tmp_path / "masked"), "--overwrite")
    assert status == 1 and (tmp_path / "masked" / "labels.txt").is_file()  # the old copy survives a failure


def test_preview_grid_and_option_errors(celeba_folder, shared_data, tmp_path, capsys):
    overlays = str(shared_data / "extras" / "images")
    status, summary = run_tool(capsys, str(celeba_folder), "--preview", str(tmp_path / "grid.png"),
                               "--overlays", overlays, "--count", "2", "--variants", "2")  # fmt: skip
    assert status == 0 and summary["types"] == ["surgical", "n95", "cloth", "overlay"]
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid.shape == (2 * 112, (1 + 4 * 2) * 112, 3)
    status, err = run_tool(capsys, str(celeba_folder), str(tmp_path / "x"), "--types", "overlay")
    assert status == 1 and "--types overlay needs --overlays DIR" in err
    status, err = run_tool(capsys, str(celeba_folder), str(tmp_path / "x"), "--prob", "2")
    assert status == 1 and "--prob must be in [0, 1]" in err


# ---------------------------------------------------------------------------------- the masked recipe


def test_masked_recipe_weights_classes_in_the_focal_loss():
    from objectives.classification import build_criterion

    # the recipe trains without them, as the FYP's code does (its weights cancel); here they are asked for
    cfg = load_config(ROOT / "configs" / "recipes" / "masked_arcface_focal.yaml",
                      ["loss.class_weights=inverse_log_frequency"])  # fmt: skip
    assert cfg.head.name == "arcface" and cfg.head.params == {"s": 45.0, "m": 0.4, "variant": "fallback"}
    assert cfg.loss.name == "focal" and cfg.loss.params == {"gamma": 2.0}
    assert cfg.loss.class_weights == "inverse_log_frequency" and cfg.data.augment.mask == 0.5
    assert cfg.optim.nesterov and cfg.schedule.milestones == [5, 10, 15, 20] and cfg.train.epochs == 25
    counts = np.array([2, 10, 50])
    data_labels = np.repeat(np.arange(3), counts)
    loss = build_criterion(cfg, data_labels, num_classes=3)
    w = 1 / np.log1p(counts)
    w = w * 3 / w.sum()
    assert np.allclose(loss.class_weights.numpy(), w)
    ce = torch.tensor([0.3, 2.5, 1.2, 4.0, 0.8], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 2])
    focal = (1 - torch.exp(-ce)) ** 2 * ce
    expected = (torch.from_numpy(w)[y] * focal).sum() / torch.from_numpy(w)[y].sum()
    assert loss.reduce(ce, y).item() == pytest.approx(expected.item())
    # the weights act with the focal loss (they do not cancel out): other weights, another loss
    unweighted = build_criterion(load_config(ROOT / "configs" / "recipes" / "masked_arcface_focal.yaml",
                                              ["loss.class_weights=none"]), data_labels, 3)  # fmt: skip
    assert unweighted.reduce(ce, y).item() == pytest.approx(focal.mean().item())
    assert abs(loss.reduce(ce, y).item() - focal.mean().item()) > 0.1
