from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from core.config import AugmentConfig, DataConfig
from data.builder import build_train_dataset
from data.decode import decode_rgb, encode_jpeg
from data.image_folder import ImageFolderFaces
from data.recordio import RecordIOFaceSet, RecordIOWriter, pack_folder
from data.recordio import pack as pack_record
from data.transforms import (
    PRESETS,
    FaceDataset,
    FaceTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    augment,
    crop_box,
    jitter,
    low_res,
    normalize_batch,
    random_crop_paste,
)


def smooth_face(seed: int = 0, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 226, (6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_flip_with_probability_one():
    img = smooth_face()
    out = augment(img, AugmentConfig(flip=1.0), rng())
    assert np.array_equal(out, np.fliplr(img))


def test_all_probabilities_zero_is_identity():
    img = smooth_face()
    cfg = AugmentConfig(flip=0.0, crop=0.0, low_res=0.0, photometric=0.0, jitter=0.0)
    for seed in range(5):
        assert np.array_equal(augment(img, cfg, rng(seed)), img)


def test_crop_paste_keeps_box_and_blackens_the_rest():
    img = smooth_face() | 1  # no black pixels in the original
    for seed in range(10):
        top, left, h, w = crop_box(112, 112, rng(seed))
        out = random_crop_paste(img, rng(seed))
        inside = np.zeros((112, 112), bool)
        inside[top : top + h, left : left + w] = True
        assert np.array_equal(out[inside], img[inside])
        assert (out[~inside] == 0).all()
        assert 0.2 * 112 * 112 * 0.99 <= h * w <= 112 * 112 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_low_res_keeps_shape_changes_detail_keeps_mean():
    img = smooth_face()
    noisy = np.clip(img.astype(int) + rng(1).integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    out = low_res(noisy, rng(3))
    assert out.shape == noisy.shape and out.dtype == np.uint8
    assert not np.array_equal(out, noisy)
    assert abs(float(out.mean()) - float(noisy.mean())) < 4


def luma(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., k].astype(np.float64) for k in range(3))
    return np.floor(0.2989 * r + 0.587 * g + 0.114 * b)


@pytest.mark.parametrize("factor", [0.5, 1.3])
def test_photometric_ops_match_closed_forms(factor):
    img = smooth_face(2).astype(np.float64)
    expect_b = np.clip(factor * img, 0, 255).astype(np.uint8)
    mean = luma(img).mean()
    expect_c = np.clip(factor * img + (1 - factor) * mean, 0, 255).astype(np.uint8)
    expect_s = np.clip(factor * img + (1 - factor) * luma(img)[..., None], 0, 255).astype(np.uint8)
    src = img.astype(np.uint8)
    for got, expect in (
        (adjust_brightness(src, factor), expect_b),
        (adjust_contrast(src, factor), expect_c),
        (adjust_saturation(src, factor), expect_s),
    ):
        assert np.abs(got.astype(int) - expect).max() <= 1  # float32 vs float64 rounding at the truncation


def test_saturation_zero_gives_grey():
    grey = adjust_saturation(smooth_face(), 0.0)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])


def test_jitter_scales_and_clips():
    img = np.full((4, 4, 3), 250, np.uint8)
    outs = {int(jitter(img, rng(s))[0, 0, 0]) for s in range(20)}
    assert max(outs) == 255  # clipped, not wrapped
    assert min(outs) >= 200 and len(outs) > 3


def test_presets():
    assert PRESETS["arcface"] == AugmentConfig(flip=0.5)
    assert PRESETS["adaface"].crop == PRESETS["adaface"].low_res == PRESETS["adaface"].photometric == 0.2
    assert PRESETS["frabsm"].jitter == 0.0 and PRESETS["frabsm"].crop == 0.15


def test_normalize_batch_values_and_bgr():
    x = torch.tensor([0, 255, 127, 128], dtype=torch.uint8).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    x[:, 1] = 0
    out = normalize_batch(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, 0].flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1, 128 / 127.5 - 1])
    )
    bgr = normalize_batch(x, color="bgr")
    assert torch.equal(bgr, out[:, [2, 1, 0]])
    with pytest.raises(TypeError, match="uint8"):
        normalize_batch(x.float())
    with pytest.raises(ValueError, match="color must be"):
        normalize_batch(x, color="yuv")


class Source:
    """Twelve copies of one face, as encoded bytes."""

    num_identities = 1

    def __init__(self, size: int = 112) -> None:
        self.buf = encode_jpeg(smooth_face(size=size))
        self.num_images = 12

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.buf, 0


def run_loader(seed: int) -> torch.Tensor:
    ds = FaceDataset(Source(), FaceTransform(AugmentConfig(flip=0.5, crop=1.0, photometric=1.0), seed=0))
    loader = DataLoader(ds, batch_size=3, num_workers=2, generator=torch.Generator().manual_seed(seed))
    return torch.cat([images for images, _ in loader])


def test_workers_differ_and_a_seeded_loader_repeats():
    a, b, c = run_loader(1), run_loader(1), run_loader(2)
    assert a.shape == (12, 3, 112, 112) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # batches 0 and 1 come from different workers: their augmentations must differ
    assert not torch.equal(a[0:3], a[3:6])
    assert len({img.numpy().tobytes() for img in a}) == 12


def test_eval_transform_is_decode_only():
    img = FaceTransform(AugmentConfig(flip=1.0, crop=1.0), train=False)(Source().buf)
    assert torch.equal(img, torch.from_numpy(decode_rgb(Source().buf).transpose(2, 0, 1).copy()))


def test_wrong_size_names_the_source(tmp_path):
    (tmp_path / "amy").mkdir()
    (tmp_path / "amy" / "big.jpg").write_bytes(encode_jpeg(smooth_face(size=150)))
    ds = FaceDataset(ImageFolderFaces(tmp_path), FaceTransform())
    with pytest.raises(ValueError, match=r"amy/big\.jpg: 150x150 image, expected an aligned 112x112"):
        ds[0]


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    for name, seeds in (("amy", [0, 1]), ("bob", [2, 3, 4])):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for s in seeds:
            (tmp_path / "faces" / name / f"{s}.jpg").write_bytes(encode_jpeg(smooth_face(s)))
    return tmp_path / "faces"


@pytest.mark.parametrize("fmt", ["folder", "rec"])
def test_builder_reads_both_formats(tiny_folder, tmp_path, fmt):
    root = tiny_folder
    if fmt == "rec":
        pack_folder(tiny_folder, tmp_path / "rec" / "train")
        root = tmp_path / "rec"
    ds = build_train_dataset(DataConfig(root=str(root), format=fmt, augment=AugmentConfig(flip=0.0)), seed=0)
    assert (ds.num_images, ds.num_identities, len(ds)) == (5, 2, 5)
    image, label = ds[4]
    assert label.item() == 1 and label.dtype == torch.int64
    expected = decode_rgb((tiny_folder / "bob" / "4.jpg").read_bytes())
    assert torch.equal(image, torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_builder_checks_configured_counts(tiny_folder):
    with pytest.raises(ValueError, match=r"data.num_classes is 3 in the config, but .*faces holds 2"):
        build_train_dataset(DataConfig(root=str(tiny_folder), format="folder", num_classes=3), seed=0)
    with pytest.raises(ValueError, match=r"data\.root is not set"):
        build_train_dataset(DataConfig(root=""), seed=0)
    shutil.rmtree(tiny_folder / "amy")
    assert build_train_dataset(DataConfig(root=str(tiny_folder), format="folder"), seed=0).num_identities == 1


def test_undecodable_jpeg_in_a_rec_names_file_and_key(tmp_path):
    good = encode_jpeg(smooth_face())
    rec = tmp_path / "train.rec"
    with RecordIOWriter(rec, tmp_path / "train.idx") as writer:
        writer.write(1, pack_record(0.0, good, id=1))
        writer.write(2, pack_record(0.0, good[:40] + b"\x00" * 300 + good[-2:], id=2))
    ds = FaceDataset(RecordIOFaceSet(rec), FaceTransform())
    assert ds[0][0].shape == (3, 112, 112)
    with pytest.raises(ValueError, match=r"train\.rec key 2: corrupt JPEG"):
        ds[1]


def test_normalize_batch_resizes_to_the_network_input():
    x = torch.full((2, 3, 112, 112), 200, dtype=torch.uint8)
    x[:, 0, :, 56:] = 0  # left half of the red channel bright, right half dark
    out = normalize_batch(x, size=64)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out[:, 1:], torch.full((2, 2, 64, 64), 200 / 127.5 - 1))  # flat stays flat
    bright, dark = 200 / 127.5 - 1, -1.0
    assert torch.allclose(out[0, 0, :, :30], torch.tensor(bright)) and torch.allclose(
        out[0, 0, :, 34:], torch.tensor(dark)
    )
    assert (out[0, 0, :, 31:33] > dark + 0.1).all() and (out[0, 0, :, 31:33] < bright - 0.1).all()  # blend
    torch.testing.assert_close(normalize_batch(x, size=112), normalize_batch(x))
    torch.testing.assert_close(normalize_batch(x, "bgr", 64), out.flip(1))
