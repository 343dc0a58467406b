from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg

from data.decode import DecodeError, decode_rgb, encode_jpeg, image_format


@pytest.fixture(scope="module")
def real_jpegs(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "celeba_aligned112").glob("*/*.jpg"))
    return files[:: max(1, len(files) // 20)][:20]  # 20 files spread over the identities


def cv2_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_jpeg_matches_opencv_rgb(real_jpegs: list[Path]) -> None:
    for path in real_jpegs:
        img = decode_rgb(path.read_bytes(), str(path))
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - cv2_rgb(path)).max() <= 2, path


def test_png_is_exact_and_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: a swapped channel order would put it in the last channel
    rgb[2, 3] = (1, 2, 3)
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert image_format(path.read_bytes()) == "PNG"
    assert np.array_equal(decode_rgb(path.read_bytes()), rgb)


def test_real_grey_png_is_exact(shared_data: Path) -> None:
    path = sorted((shared_data / "tv_8ids").glob("*/*.png"))[0]
    img = decode_rgb(path.read_bytes(), str(path))
    assert img.ndim == 3 and img.shape[2] == 3
    assert np.array_equal(img, cv2_rgb(path))


def test_grey_pgm_gets_three_equal_channels(shared_data: Path) -> None:
    path = shared_data / "orl" / "s1" / "1.pgm"
    img = decode_rgb(path.read_bytes(), str(path))
    assert img.shape == (112, 92, 3)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert np.array_equal(img[..., 0], cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def test_grey_jpeg_gets_three_equal_channels() -> None:
    grey = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (16, 1))
    img = decode_rgb(cv2.imencode(".jpg", grey)[1].tobytes())
    assert img.shape == (16, 30, 3)
    assert np.array_equal(img[..., 0], img[..., 2]) and np.abs(img[..., 0].astype(int) - grey).max() <= 2


def test_truncated_jpeg_would_decode_to_grey_without_strict_mode(real_jpegs: list[Path]) -> None:
    # Why strict mode matters: libjpeg happily returns a full-size picture for half a file.
    half = real_jpegs[0].read_bytes()
    half = half[: len(half) // 2]
    partial = simplejpeg.decode_jpeg(half, colorspace="RGB", strict=False)
    assert partial.shape == (112, 112, 3)
    with pytest.raises(DecodeError, match="truncated JPEG"):
        decode_rgb(half)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[: len(b) // 2], r"truncated JPEG \(\d+ bytes\)"),
        (lambda b: b[:-2], "truncated JPEG"),  # only the end-of-image marker missing
        (lambda b: b"garbage bytes", r"not a decodable image: unknown format \(13 bytes"),
        (lambda b: b"", "empty image data"),
        (lambda b: b[:3] + b"\x00" * 200 + b[-2:], "corrupt JPEG"),
        (lambda b: b"\x89PNG\r\n\x1a\n" + b[:100], "corrupt or truncated PNG"),
    ],
)
def test_bad_bytes_raise_naming_the_source(real_jpegs: list[Path], mangle, message: str) -> None:
    with pytest.raises(DecodeError, match=f"^train.rec key 17: {message}"):
        decode_rgb(mangle(real_jpegs[0].read_bytes()), "train.rec key 17")


def test_truncated_real_png_names_the_file(shared_data: Path) -> None:
    path = sorted((shared_data / "tv_8ids").glob("*/*.png"))[0]
    data = path.read_bytes()
    with pytest.raises(DecodeError, match=f"^{path}: corrupt or truncated PNG"):
        decode_rgb(data[: len(data) // 2], str(path))


def test_trailing_bytes_after_a_complete_jpeg_are_accepted(real_jpegs: list[Path]) -> None:
    data = real_jpegs[0].read_bytes()
    assert np.array_equal(decode_rgb(data + b"\x00" * 500), decode_rgb(data))


def test_encode_round_trip() -> None:
    img = cv2.resize(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8), (64, 64))
    data = encode_jpeg(img, quality=95)
    assert image_format(data) == "JPEG"
    back = decode_rgb(data)
    assert np.abs(back.astype(int) - img).mean() < 3
    # channel order survives: a pure-red image stays red
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert decode_rgb(encode_jpeg(red))[..., 0].min() > 240
    assert decode_rgb(encode_jpeg(img[..., 0])).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="uint8"):
        encode_jpeg(img.astype(np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8))
