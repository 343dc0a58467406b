from __future__ import annotations

import cv2
import numpy as np
import pytest

from data.decode import DecodeError, decode_rgb, encode_jpeg


@pytest.fixture(scope="module")
def real_jpeg(shared_data):
    return sorted((shared_data / "celeba_aligned112").glob("*/*.jpg"))[0]


def test_jpeg_matches_opencv_rgb(real_jpeg):
    img = decode_rgb(real_jpeg.read_bytes(), str(real_jpeg))
    ref = cv2.cvtColor(cv2.imread(str(real_jpeg)), cv2.COLOR_BGR2RGB)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - ref).max() <= 2


def test_png_is_exact_and_rgb(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(decode_rgb(path.read_bytes()), rgb)


def test_grey_pgm_gets_three_equal_channels(shared_data):
    path = shared_data / "orl" / "s1" / "1.pgm"
    img = decode_rgb(path.read_bytes(), str(path))
    assert img.shape == (112, 92, 3)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert np.array_equal(img[..., 0], cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated JPEG"),
        (lambda b: b"garbage bytes", "not a decodable image"),
        (lambda b: b"", "empty image data"),
        (lambda b: b[:2] + b"\x00" * 200 + b[-2:], "corrupt JPEG"),
    ],
)
def test_bad_bytes_raise_naming_the_source(real_jpeg, mangle, message):
    with pytest.raises(DecodeError, match=f"train.rec key 17: {message}"):
        decode_rgb(mangle(real_jpeg.read_bytes()), "train.rec key 17")


def test_encode_round_trip():
    img = cv2.resize(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8), (64, 64))
    back = decode_rgb(encode_jpeg(img, quality=95))
    assert np.abs(back.astype(int) - img).mean() < 3
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(img.astype(np.float32))
