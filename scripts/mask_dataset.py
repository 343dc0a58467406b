"""A masked copy of a face dataset: every aligned face wears a synthetic mask (``data.masks``) with a
given probability.

    python -m scripts.mask_dataset SRC DST [--prob 1.0] [--types surgical n95 cloth overlay]
                                   [--overlays DIR] [--seed 0] [--pairs one|both] [--overwrite]
    python -m scripts.mask_dataset SRC --preview docs/images/masks.png [--count 4] [--variants 2]

SRC is one of

* a RecordIO (``x.rec``, the prefix ``x`` or a folder holding ``train.rec``): DST gets a ``.rec``/``.idx``
  pair with the same keys in the same order; image records keep their header (flag, labels, ids) byte
  for byte and only their image changes; the meta header and the identity records are copied unchanged;
* a verification ``.bin``: ``--pairs one`` masks the second face of each pair (a masked probe against an
  unmasked reference), ``both`` both faces; the ``issame`` flags are kept;
* a folder of images (``root/<identity>/<img>``, any depth): the same tree, other files copied as they are.

Whether an image is masked and how is drawn from ``(seed, record key)`` (``.rec``), ``(seed, image
position)`` (``.bin``) or ``(seed, CRC32 of the relative path)`` (folders), so a copy does not depend on the
order or the number of images around it. Images that are not masked keep their bytes; masked ones are
re-encoded in their own format (JPEG at ``--quality``). Outputs are written atomically (temporary files
or folder, renamed when complete); an existing DST is refused unless ``--overwrite``. ``--preview``
writes a grid of faces of SRC (rows) with each mask type (columns) instead. The JSON summary goes to
stdout, a progress bar to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from core.cli import run_json_command
from data import masks
from data.builder import find_recordio
from data.decode import decode_rgb, encode_jpeg, image_format
from data.image_folder import IMAGE_SUFFIXES, is_image
from data.recordio import RecordIOFaceSet, RecordIOWriter, unpack
from data.verification import read_bin_raw, write_bin

PAIR_SIDES = ("one", "both")


@dataclass
class Masker:
    """Masks one encoded image with probability ``prob``, seeded by ``(seed, *key)``."""

    prob: float = 1.0
    types: Sequence[str] = masks.SYNTHETIC_TYPES
    seed: int = 0
    overlays: Mapping[str, np.ndarray] | None = None
    quality: int = 95
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"--prob must be in [0, 1], got {self.prob}")
        masks.check_types(self.types, "--types")
        if "overlay" in self.types and not self.overlays:
            raise ValueError(
                "--types overlay needs --overlays DIR (the folder of mask_<colour>.jpg pictures)"
            )

    def __call__(self, buf: bytes, source: str, *key: int) -> bytes | None:
        """The masked image's bytes, or None when this image stays as it is."""
        rng = np.random.default_rng([self.seed, *key])
        if rng.random() >= self.prob:
            self.counts["unmasked"] += 1
            return None
        img = decode_rgb(buf, source)
        style = masks.draw_style(rng, None, self.types, tuple(self.overlays or ()))
        self.counts[style.kind] += 1
        return encode_like(
            masks.render_mask(img, style, overlays=self.overlays), image_format(buf), self.quality
        )


def encode_like(img_rgb: np.ndarray, fmt: str | None, quality: int) -> bytes:
    """``img_rgb`` encoded in ``fmt`` (as :func:`data.decode.image_format` names it); JPEG by default."""
    if fmt in (None, "JPEG"):
        return encode_jpeg(img_rgb, quality)
    suffix = {"PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tiff"}.get(fmt, ".png")
    ok, buf = cv2.imencode(suffix, cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a masked image as {fmt}")
    return buf.tobytes()


def _progress(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not show, file=sys.stderr)


# --------------------------------------------------------------------------------------------- RecordIO


def rec_target(src_arg: Path, dst: Path) -> Path:
    """The ``.rec`` to write: DST itself when it ends in ``.rec``, ``DST/train.rec`` when SRC was given
    as a folder holding ``train.rec``, else the prefix ``DST.rec``."""
    if dst.suffix == ".rec":
        return dst
    if src_arg.is_dir():
        return dst / "train.rec"
    return dst.with_name(dst.name + ".rec")


def mask_recordio(src: Path, dst: Path, masker: Masker, progress: bool = True) -> dict[str, Any]:
    faces = RecordIOFaceSet(src)
    image_keys = {faces.key(i) for i in range(len(faces))}
    records = faces.records
    dst_idx = dst.with_suffix(".idx")
    with RecordIOWriter(dst, dst_idx) as writer, _progress(len(records), "masking", progress) as bar:
        for key, payload in records:
            if key in image_keys:
                where = f"{src} key {key}"
                _, image = unpack(payload, where)
                masked = masker(image, where, key)
                if masked is not None:  # the header (flag, labels, ids) stays as its bytes were
                    payload = payload[: len(payload) - len(image)] + masked
            writer.write(key, payload)
            bar.update()
    faces.close()
    return {"kind": "rec", "src": str(src), "rec": str(dst), "idx": str(dst_idx), "records": len(records),
            "images": len(image_keys)}  # fmt: skip


# ------------------------------------------------------------------------------------------------- .bin


def mask_bin(
    src: Path, dst: Path, masker: Masker, sides: str = "both", progress: bool = True
) -> dict[str, Any]:
    if sides not in PAIR_SIDES:
        raise ValueError(f"--pairs must be one of {', '.join(PAIR_SIDES)}, got {sides!r}")
    bins, issame = read_bin_raw(src)
    out = []
    with _progress(len(bins), "masking", progress) as bar:
        for i, buf in enumerate(bins):
            masked = None if sides == "one" and i % 2 == 0 else masker(buf, f"{src} image {i}", i)
            out.append(buf if masked is None else masked)
            bar.update()
    write_bin(dst, out, issame)
    return {"kind": "bin", "src": str(src), "dst": str(dst), "pairs": len(issame), "sides": sides}


# ---------------------------------------------------------------------------------------------- folders


def mask_folder(src: Path, dst: Path, masker: Masker, overwrite: bool = False, progress: bool = True) -> dict:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    images = [p for p in files if is_image(p)]
    if not images:
        raise ValueError(f"{src}: no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}) found")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with _progress(len(files), "masking", progress) as bar:
            for path in files:
                rel = path.relative_to(src)
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                masked = None
                if is_image(path):
                    masked = masker(path.read_bytes(), str(path), zlib.crc32(rel.as_posix().encode()))
                if masked is None:
                    shutil.copy2(path, target)
                else:
                    target.write_bytes(masked)
                bar.update()
        _replace_folder(tmp, dst, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"kind": "folder", "src": str(src), "dst": str(dst), "files": len(files), "images": len(images)}


def _replace_folder(tmp: Path, dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        os.rename(tmp, dst)
        return
    if not overwrite:  # checked up front too; another process may have made it since
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------- preview


def sample_faces(src: Path, count: int) -> list[np.ndarray]:
    """``count`` faces spread over SRC (one per identity for a folder), decoded RGB."""
    if src.suffix == ".bin":
        bins, _ = read_bin_raw(src)
        picks = [(bins[i], f"{src} image {i}") for i in np.linspace(0, len(bins) - 1, count).astype(int)]
    elif (rec := find_recordio(src)) is not None:
        faces = RecordIOFaceSet(rec)
        picks = [(faces.image_bytes(int(i)), f"{rec} image {i}")
                 for i in np.linspace(0, len(faces) - 1, count).astype(int)]  # fmt: skip
    elif src.is_dir():
        folders = sorted(p for p in src.iterdir() if p.is_dir()) or [src]
        chosen = [folders[int(i)] for i in np.linspace(0, len(folders) - 1, count).astype(int)]
        paths = [next(p for p in sorted(f.iterdir()) if is_image(p)) for f in chosen]
        picks = [(p.read_bytes(), str(p)) for p in paths]
    else:
        raise FileNotFoundError(f"{src}: neither a .bin, a RecordIO nor a folder of images")
    return [decode_rgb(buf, where) for buf, where in picks]


def preview_grid(
    faces: Sequence[np.ndarray], types: Sequence[str], seed: int = 0, variants: int = 1,
    overlays: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:  # fmt: skip
    """Rows of faces: the face, then ``variants`` masks of each of ``types`` (RGB uint8)."""
    rows = []
    for r, face in enumerate(faces):
        tiles = [face]
        for k, kind in enumerate(types):
            for j in range(variants):
                rng = np.random.default_rng([seed, r, k, j])
                tiles.append(masks.add_mask(face, rng, types, overlays=overlays, kind=kind))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def write_png(path: Path, img_rgb: np.ndarray, colors: int = 0) -> int:
    """Write a PNG atomically (``colors`` > 0: quantised to a palette, a much smaller file); its size."""
    from PIL import Image

    from core.fileio import atomic_write

    picture = Image.fromarray(img_rgb)
    if colors:
        picture = picture.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_write(path, "wb") as fh:
        picture.save(fh, format="PNG", optimize=True)
    return path.stat().st_size


# ------------------------------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> dict[str, Any]:
    overlays = masks.load_overlays(args.overlays) if args.overlays else None
    types = args.types or (masks.SYNTHETIC_TYPES + (("overlay",) if overlays else ()))
    if args.preview:
        if "overlay" in types and not overlays:
            raise ValueError(
                "--types overlay needs --overlays DIR (the folder of mask_<colour>.jpg pictures)"
            )
        faces = sample_faces(args.src, args.count)
        grid = preview_grid(faces, types, args.seed, args.variants, overlays)
        size = write_png(args.preview, grid, colors=args.colors)
        return {"preview": str(args.preview), "faces": len(faces), "types": list(types), "bytes": size}
    if args.dst is None:
        raise ValueError("give DST (or --preview PNG)")
    masker = Masker(args.prob, types, args.seed, overlays, args.quality)
    src, dst = args.src, args.dst
    if src.suffix == ".bin":
        _refuse_existing(dst, src, args.overwrite)
        summary = mask_bin(src, dst, masker, args.pairs, not args.quiet)
    elif (rec := find_recordio(src)) is not None:
        target = rec_target(src, dst)
        _refuse_existing(target, rec, args.overwrite)
        summary = mask_recordio(rec, target, masker, not args.quiet)
    elif src.is_dir():
        _refuse_existing(dst, src, args.overwrite)
        summary = mask_folder(src, dst, masker, args.overwrite, not args.quiet)
    else:
        raise FileNotFoundError(f"{src}: neither a .bin, a RecordIO (x.rec, prefix x, folder with train.rec) "
                                "nor a folder of images")  # fmt: skip
    return {**summary, "prob": args.prob, "seed": args.seed, "masked": dict(sorted(masker.counts.items()))}


def _refuse_existing(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the masked copy would overwrite its source")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.mask_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", type=Path, help=".rec (or prefix, or folder with train.rec), .bin, or image folder"
    )
    parser.add_argument("dst", type=Path, nargs="?", help="the masked copy")
    parser.add_argument("--prob", type=float, default=1.0, help="probability that an image is masked")
    parser.add_argument(
        "--types",
        nargs="+",
        choices=masks.MASK_TYPES,
        help="mask types drawn uniformly (default: surgical n95 cloth, + overlay with --overlays)",
    )
    parser.add_argument("--overlays", type=Path, help="folder of mask_<colour>.jpg pictures (type overlay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pairs", choices=PAIR_SIDES, default="both", help=".bin: mask one or both faces of a pair"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of masked images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--preview", type=Path, help="write a PNG grid of SRC's faces with each mask type")
    parser.add_argument("--count", type=int, default=4, help="--preview: faces (rows)")
    parser.add_argument("--variants", type=int, default=1, help="--preview: masks of each type per face")
    parser.add_argument("--colors", type=int, default=0, help="--preview: palette size (0: full colour)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_json_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
