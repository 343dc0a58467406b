"""Verification ``.bin`` sets (docs/methods.md §5.1): read, write, and build from an LFW-style pairs file.

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` holds 2N encoded 112x112 face images (pair k is
``bins[2k], bins[2k+1]``), ``issame`` N booleans. The files of the field are often Python-2 pickles, so
they are read with ``encoding="bytes"`` — and since unpickling can call any importable function, through
an unpickler that refuses every global except the few listed in :data:`ALLOWED_GLOBALS`.

What real files reference: a protocol-4 file written by Python 3 (``lfw_yunet112.bin``) and a Python-2
protocol-2 file (``str`` images, ``bool`` flags) name no global at all. The allowed ones cover the other
two layouts seen in the wild: protocol 0-2 pickles written by Python 3, which store each ``bytes`` as
``_codecs.encode(text, "latin1")``, and ``issame`` saved as a numpy bool array (``_reconstruct``,
``ndarray``, ``dtype``) or as a list of numpy bools (``scalar``), under both numpy 1 (``numpy.core``) and
numpy 2 (``numpy._core``) module names. None of them can reach the file system, a shell or an import.

    python -m data.verification info lfw.bin
    python -m data.verification make IMAGE_ROOT pairs.txt out/lfw.bin [--resize]
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.cli import run_json_command
from core.fileio import atomic_write
from data.decode import decode_rgb, encode_jpeg

PICKLE_PROTOCOL = 4  # what lfw_yunet112.bin (and insightface's Python 3 tools) use; readable by any Python 3
# The only globals a verification pickle may name (see the module docstring for which file needs which).
ALLOWED_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }
)


class VerificationFileError(ValueError):
    """A ``.bin`` or pairs file that is malformed or unsafe; the message names the file and the item."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for untrusted ``.bin`` files: Python-2 strings load as bytes, globals are whitelisted."""

    def __init__(self, fh: io.BufferedIOBase, path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only if it is in :data:`ALLOWED_GLOBALS`; anything else is refused unloaded."""
        if (module, name) not in ALLOWED_GLOBALS:
            raise VerificationFileError(
                f"{self.path}: refused to load global {module}.{name}: a verification .bin holds only "
                "image bytes and booleans (the file is corrupt or not safe to load)"
            )
        return super().find_class(module, name)


@dataclass
class VerificationSet:
    """Decoded pairs: ``images`` uint8 RGB (2N, 3, H, W), pair k = images 2k and 2k+1; ``issame`` (N,)."""

    name: str
    path: Path
    images: np.ndarray
    issame: np.ndarray

    @property
    def pairs(self) -> int:
        """Number of pairs (half the number of images)."""
        return len(self.issame)


def read_bin_raw(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and the ``issame`` flags of a ``.bin``, checked but not decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: verification .bin not found")
    try:
        with path.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, path).load()
    except VerificationFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise VerificationFileError(f"{path}: not a readable verification pickle: {err}") from None
    if not (isinstance(obj, tuple) and len(obj) == 2):
        shape = f"a {len(obj)}-tuple" if isinstance(obj, tuple) else type(obj).__name__
        raise VerificationFileError(f"{path}: expected a pickled (bins, issame) pair, got {shape}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise VerificationFileError(f"{path}: bins must be a list of image bytes, got {type(bins).__name__}")
    for i, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise VerificationFileError(f"{path}: image {i} is {type(item).__name__}, expected bytes")
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or issame.dtype != np.bool_:
            raise VerificationFileError(
                f"{path}: issame must be a flat bool array, got {issame.dtype} of shape {issame.shape}"
            )
    elif isinstance(issame, (list, tuple)):
        for i, flag in enumerate(issame):
            # 0/1 ints are refused too: a file holding labels where flags belong is probably not a .bin
            if not isinstance(flag, (bool, np.bool_)):
                raise VerificationFileError(
                    f"{path}: issame must be a flat list of booleans, but issame[{i}] is "
                    f"{type(flag).__name__} {flag!r}"
                )
    else:
        raise VerificationFileError(
            f"{path}: issame must be a flat list of booleans, got {type(issame).__name__}"
        )
    flags = np.asarray(issame, dtype=bool).reshape(-1)
    if len(flags) == 0:
        raise VerificationFileError(f"{path}: holds no pairs")
    if len(bins) != 2 * len(flags):
        raise VerificationFileError(
            f"{path}: {len(bins)} images for {len(flags)} pairs; expected exactly 2 images per pair"
        )
    return [bytes(b) for b in bins], flags


def load_bin(path: str | os.PathLike[str], workers: int = 0) -> VerificationSet:
    """Read and decode a ``.bin`` (images RGB, N x 3 x H x W); all images must have one size.

    ``workers`` > 1 decodes in that many threads (libjpeg-turbo and OpenCV release the GIL while they
    decode), each filling its own slice of the result, so the images are the same as a sequential
    decode's; any error is the one the sequential decode would raise first. Undecodable images raise
    :class:`data.decode.DecodeError` naming ``"<path> image <i>"``.
    """
    path = Path(path)
    bins, issame = read_bin_raw(path)
    first = decode_rgb(bins[0], f"{path} image 0")
    images = np.empty((len(bins), 3, *first.shape[:2]), dtype=np.uint8)
    # An image used by several pairs is one shared object in the pickle (memo): decode it once.
    decoded_at: dict[int, int] = {}
    source = np.array([decoded_at.setdefault(id(buf), i) for i, buf in enumerate(bins)])
    unique = np.flatnonzero(source == np.arange(len(bins)))

    def decode(indices: np.ndarray) -> None:
        for i in indices:
            img = first if i == 0 else decode_rgb(bins[i], f"{path} image {i}")
            if img.shape != first.shape:
                size, size0 = f"{img.shape[1]}x{img.shape[0]}", f"{first.shape[1]}x{first.shape[0]}"
                raise VerificationFileError(f"{path}: image {i} is {size}, but image 0 is {size0}")
            images[i] = img.transpose(2, 0, 1)

    if workers > 1:
        # Contiguous chunks in index order; results are read in that order, so the first error raised
        # here is the lowest-index bad image, as in the sequential loop.
        chunks = np.array_split(unique, min(len(unique), 8 * workers))
        pool = ThreadPoolExecutor(workers)
        try:
            for _ in pool.map(decode, chunks):
                pass
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, chunks not yet started are dropped
    else:
        decode(unique)
    duplicates = np.flatnonzero(source != np.arange(len(bins)))
    images[duplicates] = images[source[duplicates]]
    return VerificationSet(name=path.stem, path=path, images=images, issame=issame)


def write_bin(path: str | os.PathLike[str], jpeg_bytes: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(jpeg_bytes, issame)`` in the ``.bin`` layout (pickle protocol 4), atomically.

    Pass the same ``bytes`` object for an image used by several pairs: the pickle then stores it once.
    """
    if len(issame) == 0:
        raise ValueError(f"{path}: no pairs to write")
    if len(jpeg_bytes) != 2 * len(issame):
        raise ValueError(f"{path}: {len(jpeg_bytes)} images for {len(issame)} pairs; need 2 per pair")
    for i, item in enumerate(jpeg_bytes):
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise ValueError(f"{path}: image {i} is {type(item).__name__}, expected encoded image bytes")
    # bytes(b) of a bytes object is that same object, so shared images stay shared in the pickle.
    payload = ([bytes(b) for b in jpeg_bytes], [bool(s) for s in issame])
    with atomic_write(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=PICKLE_PROTOCOL)


# ------------------------------------------------------------------------------------------ pairs files


@dataclass(frozen=True)
class Pair:
    """One line of a pairs file: image ``num1`` of ``name1`` against image ``num2`` of ``name2``."""

    name1: str
    num1: int
    name2: str
    num2: int
    line: int

    @property
    def same(self) -> bool:
        """Whether both images show the same person."""
        return self.name1 == self.name2


def read_pairs(pairs_txt: str | os.PathLike[str]) -> list[Pair]:
    """Pairs of an LFW ``pairs.txt``: ``name n1 n2`` (same person) or ``name1 n1 name2 n2``.

    A first line of two integers (folds, pairs per fold) is a header and skipped; blank lines are ignored.
    """
    path = Path(pairs_txt)
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or (lineno == 1 and len(fields) == 2 and all(f.isdigit() for f in fields)):
            continue
        try:
            if len(fields) == 3:
                pairs.append(Pair(fields[0], int(fields[1]), fields[0], int(fields[2]), lineno))
            elif len(fields) == 4:
                pairs.append(Pair(fields[0], int(fields[1]), fields[2], int(fields[3]), lineno))
            else:
                raise ValueError(f"{len(fields)} fields")
        except ValueError as err:
            raise VerificationFileError(
                f"{path}:{lineno}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {line.strip()!r} ({err})"
            ) from None
    if not pairs:
        raise VerificationFileError(f"{path}: no pairs found")
    return pairs


def find_image(root: Path, name: str, number: int) -> Path | None:
    """``root/name/name_NNNN.jpg`` (LFW folders) or ``root/name_NNNN.jpg`` (flat)."""
    file = f"{name}_{number:04d}.jpg"
    for candidate in (root / name / file, root / file):
        if candidate.is_file():
            return candidate
    return None


def _pair_image_bytes(path: Path, size: int, resize: bool) -> bytes:
    """The bytes to store for one image: the file itself if it is a ``size`` JPEG, else a re-encoding."""
    data = path.read_bytes()
    img = decode_rgb(data, str(path))
    if img.shape[:2] == (size, size) and data[:2] == b"\xff\xd8":
        return data  # an aligned JPEG is stored exactly as it is
    if img.shape[:2] != (size, size):
        if not resize:
            raise VerificationFileError(
                f"{path}: {img.shape[1]}x{img.shape[0]} image, expected an aligned {size}x{size} face "
                "(align with face_alignment first, or pass resize=True / --resize to scale it)"
            )
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return encode_jpeg(img)


def make_bin(
    image_root: str | os.PathLike[str],
    pairs_txt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    resize: bool = False,
    image_size: int = 112,
) -> dict[str, Any]:
    """Build a ``.bin`` from the images named by an LFW-style pairs file.

    Images are looked up as ``root/name/name_NNNN.jpg`` (LFW folders) or ``root/name_NNNN.jpg`` (flat
    folder). They should already be aligned ``image_size`` crops — alignment belongs to
    ``face_alignment``, not here; another size is an error unless ``resize``, which scales it with
    ``cv2.INTER_AREA`` and re-encodes it. JPEG crops of the right size are stored byte for byte, other
    formats are encoded as JPEG. Returns a summary: ``out``, ``pairs``, ``same``, ``images`` (distinct).
    """
    root, pairs_path = Path(image_root), Path(pairs_txt)
    pairs = read_pairs(pairs_path)
    cache: dict[Path, bytes] = {}
    images: list[bytes] = []
    for pair in pairs:
        for name, num in ((pair.name1, pair.num1), (pair.name2, pair.num2)):
            path = find_image(root, name, num)
            if path is None:
                tried = f"{root / name / f'{name}_{num:04d}.jpg'} or {root / f'{name}_{num:04d}.jpg'}"
                raise VerificationFileError(f"{pairs_path}:{pair.line}: image not found: tried {tried}")
            if path not in cache:
                cache[path] = _pair_image_bytes(path, image_size, resize)
            images.append(cache[path])
    write_bin(out, images, [p.same for p in pairs])
    return {"out": str(out), "pairs": len(pairs), "same": sum(p.same for p in pairs), "images": len(cache)}


# ------------------------------------------------------------------------------------------------ CLI


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a ``.bin``; decodes every image, so it doubles as a full check of the file."""
    vset = load_bin(path)
    return {
        "path": str(path),
        "pairs": vset.pairs,
        "same": int(vset.issame.sum()),
        "images": len(vset.images),
        "shape": list(vset.images.shape),
        "bytes": Path(path).stat().st_size,
    }


def build_parser() -> argparse.ArgumentParser:
    """Command line: ``info PATH.bin`` or ``make IMAGE_ROOT PAIRS_TXT OUT.bin [--resize]``."""
    parser = argparse.ArgumentParser(prog="python -m data.verification", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print a JSON summary of a .bin")
    p_info.add_argument("path", type=Path)
    p_make = sub.add_parser("make", help="build a .bin from an image folder and a pairs file")
    p_make.add_argument("image_root", type=Path)
    p_make.add_argument("pairs_txt", type=Path)
    p_make.add_argument("out", type=Path)
    p_make.add_argument("--resize", action="store_true", help="scale images that are not 112x112")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of :func:`build_parser`; JSON on stdout."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return run_json_command(lambda: info(args.path))
    return run_json_command(lambda: make_bin(args.image_root, args.pairs_txt, args.out, resize=args.resize))


if __name__ == "__main__":
    sys.exit(main())
