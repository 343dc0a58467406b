"""Image decoding: encoded bytes -> uint8 RGB array, with errors that name the source.

JPEGs go through simplejpeg (libjpeg-turbo, the fastest decoder measured by ``scripts/bench_decode.py``);
PNG, BMP, PGM and other formats through OpenCV. A corrupt or truncated file is an error, never a partially
decoded picture.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

JPEG_MAGIC = b"\xff\xd8"
JPEG_END = b"\xff\xd9"


class DecodeError(ValueError):
    """Bytes that are not a decodable image; the message names where they came from."""


def decode_rgb(buf: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an encoded image to an H x W x 3 uint8 RGB array (grey images get three equal channels)."""
    if not buf:
        raise DecodeError(f"{source}: empty image data")
    if buf[:2] == JPEG_MAGIC:
        return _decode_jpeg(buf, source)
    arr = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise DecodeError(f"{source}: not a decodable image ({len(buf)} bytes, starts with {buf[:8]!r})")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _decode_jpeg(buf: bytes, source: str) -> np.ndarray:
    # libjpeg fills a truncated scan with grey and only warns; a JPEG must end with its EOI marker
    # (trailing padding after it is allowed), so a cut-off file is caught before decoding.
    if JPEG_END not in buf[-64:]:
        raise DecodeError(f"{source}: truncated JPEG ({len(buf)} bytes, no end-of-image marker)")
    try:
        return simplejpeg.decode_jpeg(buf, colorspace="RGB")
    except ValueError as err:
        raise DecodeError(f"{source}: corrupt JPEG ({len(buf)} bytes): {err}") from None


def encode_jpeg(img_rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode an H x W x 3 uint8 RGB array (or H x W grey) as JPEG bytes."""
    img = np.ascontiguousarray(img_rgb)
    if img.dtype != np.uint8:
        raise ValueError(f"encode_jpeg needs uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"encode_jpeg needs an H x W x 3 RGB array, got shape {img.shape}")
    return simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB")
