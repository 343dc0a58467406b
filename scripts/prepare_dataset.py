"""Photos -> detected, aligned 112x112 faces -> a training RecordIO and/or a verification .bin.

    python -m scripts.prepare_dataset PHOTOS OUT [--flat] [--rec] [--pairs pairs.txt --bin lfw.bin]

PHOTOS is ``root/<identity>/<image>`` or, with ``--flat``, one folder whose file names carry the identity
(the LFW layout ``Name_Surname_0001.jpg``). Every photo goes through YuNet detection and 5-point alignment
to the ArcFace template; a photo with several faces gives its largest one. Crops land in
``OUT/aligned/<identity>/<name>.jpg`` (kept between runs: a second run aligns only what is missing).
Photos without a face are listed in ``OUT/failures.txt`` and in the summary, never dropped silently.
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

from data.decode import DecodeError, decode_rgb, encode_jpeg
from data.recordio import pack_folder
from data.verification import make_bin
from face_alignment import YuNetDetector, align_face, largest_face

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp"}
_detector: YuNetDetector | None = None


def list_photos(root: Path, flat: bool) -> list[tuple[str, Path]]:
    """(identity, photo) pairs, sorted. Flat layout: the identity is the name without its ``_NNNN``."""
    if flat:
        photos = [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return [(re.sub(r"_\d+$", "", p.stem), p) for p in photos]
    return [
        (folder.name, p)
        for folder in sorted(d for d in root.iterdir() if d.is_dir())
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def _init_worker(detector_path: str | None) -> None:
    global _detector
    _detector = YuNetDetector(detector_path)


def align_one(job: tuple[str, str, str]) -> tuple[str, str, int]:
    """Align one photo to ``target``: (photo, outcome ok | no_face | unreadable, faces found)."""
    _, photo, target = job
    try:
        image = decode_rgb(Path(photo).read_bytes(), photo)
    except DecodeError:
        return photo, "unreadable", 0
    assert _detector is not None
    faces = _detector.detect(image)
    face = largest_face(faces)
    if face is None:
        return photo, "no_face", 0
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_bytes(encode_jpeg(align_face(image, face.landmarks), quality=95))
    return photo, "ok", len(faces)


def align_all(
    photos: Sequence[tuple[str, Path]], aligned: Path, workers: int, detector: str | None
) -> dict[str, object]:
    jobs = [(ident, str(p), str(aligned / ident / f"{p.stem}.jpg")) for ident, p in photos]
    todo = [j for j in jobs if not Path(j[2]).is_file()]
    failures, several = [], 0
    if todo:
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
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--detector", help="YuNet ONNX file (default: found in $FACEREC_MODELS)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.photos.is_dir():
        print(f"prepare_dataset: {args.photos} is not a folder of photos", file=sys.stderr)
        return 2
    aligned = args.out / "aligned"
    photos = list_photos(args.photos, args.flat)
    if not photos:
        print(f"prepare_dataset: no photos under {args.photos}", file=sys.stderr)
        return 2
    summary = align_all(photos, aligned, args.workers, args.detector)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "failures.txt").write_text("".join(f"{line}\n" for line in summary["failures"]))
    summary["failures"] = len(summary["failures"])
    summary["identities"] = len({ident for ident, _ in photos})
    if args.rec:
        pack_folder(aligned, args.out / "train")
        summary["rec"] = str(args.out / "train.rec")
    if args.pairs:
        made = make_bin(aligned, args.pairs, args.out / (args.bin or "pairs.bin"))
        summary["bin"] = made
    print(json.dumps(summary, indent=2))
    if summary["failures"]:
        print(
            f"{summary['failures']} photos without a usable face: {args.out / 'failures.txt'}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
