"""Photos -> detected, aligned 112x112 faces -> a training RecordIO and/or a verification .bin.

    python -m scripts.prepare_dataset PHOTOS OUT [--flat] [--rec] [--pairs pairs.txt --bin lfw.bin]

PHOTOS is ``root/<identity>/<image>`` or, with ``--flat``, one folder whose file names carry the identity
(the LFW layout ``Name_Surname_0001.jpg``). Every photo goes through YuNet detection and 5-point alignment
to the ArcFace template; a photo with several faces gives its largest one. Crops land in
``OUT/aligned/<identity>/<name>.jpg`` (kept between runs: a second run aligns only what is missing; each
crop is written atomically, so a killed run leaves no half-written crop to be reused). Two photos that
would give the same crop file (``x.jpg`` and ``x.png`` of one identity) are refused before anything is
written, naming both. Photos without a face, or unreadable, are listed in ``OUT/failures.txt`` and in the
summary, never dropped silently. Large photos are detected on a downscaled copy and aligned from the full
resolution (see ``face_alignment``).
``--rec`` packs the crops into ``OUT/train.rec/.idx/.lst``; ``--pairs`` with ``--bin`` writes the pairs of an
LFW-style pairs file as ``OUT/<bin>``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from core.cli import check_writable, error_line, main_guard
from core.fileio import atomic_write
from core.threads import fork_safe_opencv
from data.decode import DecodeError, decode_rgb, encode_jpeg
from data.image_folder import list_images, scan_identity_folders
from data.recordio import pack_folder
from data.verification import make_bin
from face_alignment import YuNetDetector, align_face, largest_face

_detector: YuNetDetector | None = None


def list_photos(root: Path, flat: bool) -> list[tuple[str, Path]]:
    """(identity, photo) pairs, sorted; photos are what :mod:`data.image_folder` lists as images, so the
    crops packed with ``--rec`` come from the photos a training run on PHOTOS would read. Flat layout: the
    identity is the name without its ``_NNNN``."""
    if flat:
        photos, _ = list_images(root)
        return [(re.sub(r"_\d+$", "", p.stem), p) for p in photos]
    return [(name, p) for name, images in scan_identity_folders(root).identities for p in images]


def _init_worker(detector_path: str | None) -> None:
    global _detector
    _detector = YuNetDetector(detector_path)


def align_one(job: tuple[str, str, str]) -> tuple[str, str, int]:
    """Align one photo to ``target``: (photo, outcome ok | no_face | unreadable, faces found)."""
    _, photo, target = job
    try:
        image = decode_rgb(Path(photo).read_bytes(), photo)
    except (DecodeError, OSError):
        return photo, "unreadable", 0
    assert _detector is not None
    faces = _detector.detect(image)
    face = largest_face(faces)
    if face is None:
        return photo, "no_face", 0
    with atomic_write(target, "wb", durable=False) as fh:
        fh.write(encode_jpeg(align_face(image, face.landmarks), quality=95))
    return photo, "ok", len(faces)


def crop_path(aligned: Path, identity: str, photo: Path) -> Path:
    return aligned / identity / f"{photo.stem}.jpg"


def clashes(photos: Sequence[tuple[str, Path]], aligned: Path) -> list[tuple[Path, Path, Path]]:
    """(first photo, second photo, crop) for each pair of photos that would write the same crop file."""
    first: dict[Path, Path] = {}
    found = []
    for ident, photo in photos:
        target = crop_path(aligned, ident, photo)
        if target in first:
            found.append((first[target], photo, target))
        else:
            first[target] = photo
    return found


def align_all(
    photos: Sequence[tuple[str, Path]], aligned: Path, workers: int, detector: str | None
) -> dict[str, object]:
    jobs = [(ident, str(p), str(crop_path(aligned, ident, p))) for ident, p in photos]
    todo = [j for j in jobs if not Path(j[2]).is_file()]
    failures, several = [], 0
    if todo:
        fork_safe_opencv()
        with Pool(workers, initializer=_init_worker, initargs=(detector,)) as pool:
            for photo, outcome, count in tqdm(pool.imap(align_one, todo, chunksize=16), total=len(todo),
                                              desc="align", disable=None):  # fmt: skip
                if outcome != "ok":
                    failures.append(f"{photo}\t{outcome}")
                several += count > 1
    return {"photos": len(jobs), "aligned_now": len(todo) - len(failures), "reused": len(jobs) - len(todo),
            "failures": failures, "several_faces": several}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("photos", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--flat", action="store_true", help="one folder, identity in the file name")
    parser.add_argument("--rec", action="store_true", help="pack the crops into OUT/train.rec")
    parser.add_argument("--pairs", type=Path, help="LFW-style pairs file for a verification .bin")
    parser.add_argument("--bin", default="", help="name of the .bin written in OUT (with --pairs)")
    parser.add_argument("--workers", type=positive_int, default=2, help="processes aligning photos")
    parser.add_argument("--detector", help="YuNet ONNX file (default: found in $FACEREC_MODELS)")
    return parser


@main_guard("prepare_dataset")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.photos.is_dir():
        print(f"prepare_dataset: {args.photos} is not a folder of photos", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"prepare_dataset: OUT {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    check_writable(args.out / "failures.txt")  # before any photo is aligned
    if args.pairs and not args.pairs.is_file():
        print(f"prepare_dataset: --pairs {args.pairs}: file not found", file=sys.stderr)
        return 2
    aligned = args.out / "aligned"
    photos = list_photos(args.photos, args.flat)
    if not photos:
        print(f"prepare_dataset: no photos under {args.photos}", file=sys.stderr)
        return 2
    clash = clashes(photos, aligned)
    if clash:
        a, b, target = clash[0]
        more = f" (and {len(clash) - 1} more such pairs)" if len(clash) > 1 else ""
        print(f"prepare_dataset: {a} and {b} would both be aligned to {target}{more}; rename or remove one",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        YuNetDetector(args.detector)  # a missing or wrong model is named here, not in every worker
    except (OSError, ValueError) as err:
        print(f"prepare_dataset: {error_line(err)}", file=sys.stderr)
        return 2
    aligned.mkdir(parents=True, exist_ok=True)
    summary = align_all(photos, aligned, args.workers, args.detector)
    with atomic_write(args.out / "failures.txt", "w", encoding="utf-8") as fh:
        fh.write("".join(f"{line}\n" for line in summary["failures"]))
    summary["failures"] = len(summary["failures"])
    summary["identities"] = len({ident for ident, _ in photos})
    crops = summary["aligned_now"] + summary["reused"]
    try:
        if (args.rec or args.pairs) and crops == 0:
            raise ValueError(
                f"none of the {len(photos)} photos under {args.photos} gave a face (listed in "
                f"{args.out / 'failures.txt'}); nothing to pack"
            )
        if args.rec:
            pack_folder(aligned, args.out / "train")
            summary["rec"] = str(args.out / "train.rec")
        if args.pairs:
            summary["bin"] = make_bin(aligned, args.pairs, args.out / (args.bin or "pairs.bin"))
    except (OSError, ValueError) as err:
        print(f"prepare_dataset: {error_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if summary["failures"]:
        print(
            f"{summary['failures']} photos without a usable face: {args.out / 'failures.txt'}",
            file=sys.stderr,
        )
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
