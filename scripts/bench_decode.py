"""Compare JPEG decoders on real 112x112 face crops: images/s and how far their outputs differ.

    python -m scripts.bench_decode [--folder DIR] [--images 2000] [--repeat 3]

Every decoder gets the same in-memory JPEG bytes (no disk reads in the timing). ``data.decode.decode_rgb``
uses the fastest; its own row includes the format sniffing and error handling it adds.
"""

from __future__ import annotations

import argparse
import io
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from core.paths import shared_data_dir
from data.decode import decode_rgb


def decode_cv2(buf: bytes) -> np.ndarray:
    """OpenCV (its own libjpeg-turbo build), BGR converted to RGB as a caller would need."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def decode_cv2_rgb(buf: bytes) -> np.ndarray:
    """OpenCV asked for RGB directly (``IMREAD_COLOR_RGB``, OpenCV >= 4.10), no extra conversion pass."""
    return cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR_RGB)


def decode_pil(buf: bytes) -> np.ndarray:
    """Pillow, converted to RGB."""
    return np.asarray(Image.open(io.BytesIO(buf)).convert("RGB"))


def decode_simplejpeg(buf: bytes) -> np.ndarray:
    """simplejpeg (libjpeg-turbo TurboJPEG API), RGB straight from the decoder."""
    return simplejpeg.decode_jpeg(buf, colorspace="RGB")


DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "cv2": decode_cv2,
    **({"cv2 IMREAD_COLOR_RGB": decode_cv2_rgb} if hasattr(cv2, "IMREAD_COLOR_RGB") else {}),
    "PIL": decode_pil,
    "simplejpeg": decode_simplejpeg,
    "data.decode.decode_rgb": decode_rgb,
}


def load_jpegs(folder: Path, count: int) -> list[bytes]:
    """The bytes of the first ``count`` JPEGs under ``folder`` (sorted, recursive)."""
    files = sorted(folder.rglob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no .jpg files under {folder}")
    return [f.read_bytes() for f in files]


def time_decoder(fn: Callable[[bytes], np.ndarray], jpegs: list[bytes]) -> float:
    """Seconds for one pass of ``fn`` over all ``jpegs``."""
    start = time.perf_counter()
    for buf in jpegs:
        fn(buf)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=shared_data_dir() / "celeba_aligned112")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="timing passes; the best one counts")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    jpegs = load_jpegs(args.folder, args.images)
    shapes = {decode_simplejpeg(b).shape for b in jpegs}
    print(f"{len(jpegs)} JPEGs from {args.folder}, shapes {sorted(shapes)}")
    outputs = {name: [fn(b) for b in jpegs] for name, fn in DECODERS.items()}
    for name, fn in DECODERS.items():
        best = min(time_decoder(fn, jpegs) for _ in range(args.repeat))
        print(f"{name:<24} {len(jpegs) / best:>9.0f} images/s")
    print("max |difference| in grey levels over all images:")
    for a, b in itertools.combinations(DECODERS, 2):
        pairs = zip(outputs[a], outputs[b], strict=True)
        diff = max(int(np.abs(x.astype(np.int16) - y).max()) for x, y in pairs)
        print(f"  {a} vs {b}: {diff}")


if __name__ == "__main__":
    main()
