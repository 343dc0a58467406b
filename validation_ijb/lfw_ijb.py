"""A small IJB_release-style tree built from LFW photos, to run the IJB evaluator end to end without the
(licensed) IJB data, and to time decoding + alignment.

    python -m validation_ijb.lfw_ijb --out work_dirs/lfw_ijb [--identities 24] [--bench 0 1 2]
    python -m validation_ijb.evaluate --model M.onnx --data-root work_dirs/lfw_ijb --dataset ijbc

Identities are the LFW people with at least four photos (identity = file name without ``_NNNN.jpg``),
``identities`` of them evenly spread over the sorted names. Landmarks and faceness scores come from the
framework's YuNet detector (largest face); the loose crops are copies of the photos, one file per row of
``face_tid_mid``. For identity ``i`` (0-based) with photos p0..p3:

* gallery template ``1000 + i``: p0, p1 -- one media id for both when ``i % 3 == 0`` (frames of one
  video), two media otherwise; in gallery G1 when ``i`` is even, G2 when odd;
* probe template ``2000 + i``: p2 and p3 in two media; when ``i % 4 == 1`` p2 is listed twice in its
  media, when ``i % 4 == 2`` p3 is listed again as a third media;
* subject id ``100 + i``; 1:1 pairs: every (gallery i, probe j), label 1 when i == j.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.fileio import atomic_write
from core.paths import shared_data_dir
from data.decode import decode_rgb
from face_alignment import YuNetDetector, largest_face

CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"


@dataclass
class Row:
    """One row of ``face_tid_mid``: the photo it copies, its identity index, template and media."""

    photo: Path
    identity: int
    template: int
    media: int


@dataclass
class LfwIJB:
    root: Path  # the IJB_release folder (holding IJBC/)
    people: list[str]  # identity index -> LFW name
    rows: list[Row]


def pick_people(photos: Path, identities: int, per_person: int = 4) -> dict[str, list[Path]]:
    """``identities`` people with at least ``per_person`` photos, evenly spread over the sorted names."""
    by_person: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(photos.glob("*.jpg")):
        by_person[path.stem.rsplit("_", 1)[0]].append(path)
    eligible = [name for name, paths in sorted(by_person.items()) if len(paths) >= per_person]
    if len(eligible) < identities:
        raise ValueError(f"{photos}: {len(eligible)} people have {per_person} photos; {identities} wanted")
    chosen = [eligible[k * len(eligible) // identities] for k in range(identities)]
    return {name: by_person[name][:per_person] for name in chosen}


def layout(people: dict[str, list[Path]]) -> list[Row]:
    """The rows of ``face_tid_mid`` (see the module notes)."""
    rows: list[Row] = []
    media = iter(range(50_000, 10**9))
    for i, (_, (p0, p1, p2, p3)) in enumerate(people.items()):
        gallery, probe = 1000 + i, 2000 + i
        shared = next(media)
        rows += [Row(p0, i, gallery, shared), Row(p1, i, gallery, shared if i % 3 == 0 else next(media))]
        m2, m3 = next(media), next(media)
        rows += [Row(p2, i, probe, m2), Row(p3, i, probe, m3)]
        if i % 4 == 1:
            rows.append(Row(p2, i, probe, m2))
        elif i % 4 == 2:
            rows.append(Row(p3, i, probe, next(media)))
    return rows


def build(
    out: Path, photos: Path | None = None, identities: int = 24, detector: YuNetDetector | None = None
) -> LfwIJB:
    """Write the tree under ``out`` (``out/IJBC/loose_crop``, ``out/IJBC/meta``) and describe it."""
    photos = photos or shared_data_dir() / "lfw_color150"
    people = pick_people(photos, identities)
    rows = layout(people)
    detector = detector or YuNetDetector()
    folder = out / "IJBC"
    crops = folder / "loose_crop"
    crops.mkdir(parents=True, exist_ok=True)
    found: dict[Path, tuple[np.ndarray, float, np.ndarray]] = {}
    for path in dict.fromkeys(r.photo for r in rows):
        face = largest_face(detector.detect(decode_rgb(path.read_bytes(), str(path))))
        if face is None:
            raise ValueError(f"{path}: the detector finds no face")
        found[path] = face.landmarks, face.score, face.box
    landmark_lines, media_lines = [], []
    lists: dict[str, list[str]] = {"G1": [CSV_HEADER], "G2": [CSV_HEADER], "probe_mixed": [CSV_HEADER]}
    for k, row in enumerate(rows, 1):
        name = f"{k}.jpg"
        shutil.copyfile(row.photo, crops / name)
        landmarks, score, box = found[row.photo]
        coords = " ".join(f"{v:.3f}" for v in landmarks.ravel())
        landmark_lines.append(f"{name} {coords} {score:.3f}")
        media_lines.append(f"{name} {row.template} {row.media}")
        x, y, w, h = (int(v) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1]))
        csv_row = f"{row.template},{100 + row.identity},img/{k}.jpg,{x},{y},{w},{h}"
        if row.template < 2000:
            lists["G1" if row.identity % 2 == 0 else "G2"].append(csv_row)
        else:
            lists["probe_mixed"].append(csv_row)
    n = len(people)
    pairs = [f"{1000 + i} {2000 + j} {int(i == j)}" for i in range(n) for j in range(n)]
    meta = folder / "meta"
    files = {
        "ijbc_name_5pts_score.txt": landmark_lines,
        "ijbc_face_tid_mid.txt": media_lines,
        "ijbc_template_pair_label.txt": pairs,
        "ijbc_1N_gallery_G1.csv": lists["G1"],
        "ijbc_1N_gallery_G2.csv": lists["G2"],
        "ijbc_1N_probe_mixed.csv": lists["probe_mixed"],
    }
    for file_name, lines in files.items():
        with atomic_write(meta / file_name, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return LfwIJB(out, list(people), rows)


def bench(root: Path, workers: Sequence[int], copies: int = 8, repeat: int = 2) -> dict[int, float]:
    """Images per second of decoding + aligning the tree's faces (``copies`` passes over them) through
    :func:`evaluation.extract.extract_dataset` with a model that costs nothing, best of ``repeat``; the worker
    start-up is included, as in an evaluation."""
    import torch

    from evaluation.extract import extract_dataset
    from validation_ijb.dataset import AlignedFaces
    from validation_ijb.meta import load_ijb

    meta = load_ijb(root, "ijbc", ("1:1",))
    faces = torch.utils.data.ConcatDataset([AlignedFaces(meta.image_paths, meta.landmarks)] * copies)

    def no_model(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :, 0, :2].float().flatten(1)

    rates = {}
    for n in workers:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            extract_dataset(no_model, faces, batch_size=64, flip=False, num_workers=n)
            best = min(best, time.perf_counter() - start)
        rates[n] = len(faces) / best
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the tree (IJB_release layout)")
    parser.add_argument("--photos", type=Path, help="LFW photos (default: the real data's lfw_color150)")
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--bench", type=int, nargs="*", metavar="WORKERS", help="time decode+align")
    args = parser.parse_args(argv)
    try:
        tree = build(args.out, args.photos, args.identities)
    except (OSError, ValueError) as err:
        print(f"lfw_ijb: {err}", file=sys.stderr)
        return 2
    print(f"{tree.root}: {len(tree.people)} people, {len(tree.rows)} face images")
    for n, rate in bench(tree.root, args.bench or []).items():
        print(f"decode + align, {n} workers: {rate:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
