"""Compare JPEG decoders on real 112x112 face crops: images/s and agreement between them.

    python -m scripts.bench_decode [--images 2000] [--repeat 3]

``data.decode.decode_rgb`` uses the fastest one that installs from PyPI on every platform we run on.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from core.paths import shared_data_dir
from data.decode import decode_rgb
from data.verification import read_bin_raw


def decode_cv2(buf: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def decode_pil(buf: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))


def decode_simplejpeg(buf: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(buf, colorspace="RGB")


DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "cv2": decode_cv2,
    "PIL": decode_pil,
    "simplejpeg": decode_simplejpeg,
    "data.decode.decode_rgb": decode_rgb,
}


def load_jpegs(count: int) -> tuple[list[bytes], str]:
    lfw = shared_data_dir() / "lfw_yunet112.bin"
    if lfw.is_file():
        return read_bin_raw(lfw)[0][:count], f"{lfw} (aligned LFW crops)"
    rng = np.random.default_rng(0)
    imgs = [cv2.resize(rng.integers(0, 256, (8, 8, 3), np.uint8), (112, 112)) for _ in range(count)]
    return [cv2.imencode(".jpg", im)[1].tobytes() for im in imgs], "synthetic 112x112 JPEGs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    jpegs, source = load_jpegs(args.images)
    print(f"{len(jpegs)} JPEGs from {source}")
    reference = [decode_cv2(b) for b in jpegs[:200]]
    for name, fn in DECODERS.items():
        best = min(_time(fn, jpegs) for _ in range(args.repeat))
        diff = max(int(np.abs(fn(b).astype(int) - r).max()) for b, r in zip(jpegs, reference, strict=False))
        print(f"{name:<24} {len(jpegs) / best:>9.0f} images/s   max |diff| vs cv2: {diff}")


def _time(fn: Callable[[bytes], np.ndarray], jpegs: list[bytes]) -> float:
    start = time.perf_counter()
    for buf in jpegs:
        fn(buf)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
