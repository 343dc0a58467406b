"""The time of a whole IJB-C evaluation projected from measured parts.

    python -m scripts.bench_ijbc                                  # measure here, project for 16 cores
    python -m scripts.bench_ijbc --gpu-check out/gpu_check.json   # the GPU's extraction rate from there
    python -m scripts.bench_ijbc --gpu-images-per-s 6000 --cores 32

IJB-C (insightface's ``IJB_release`` layout, docs/methods.md §5.3) is 469,375 loose face crops in 23,124
templates and 15,658,489 template pairs for 1:1 verification. An evaluation
(``python -m validation_ijb.evaluate``) decodes and aligns every crop in loader processes while the GPU
embeds them and their flips, then pools the features into templates and scores the pairs. This script
measures each part where it runs:

* decode + alignment, images/s on one core: the real LFW photos of the data folder (150x150 JPEG loose
  crops, as IJB-C's) read, decoded and warped to the 112x112 template by ``validation_ijb.dataset``'s
  ``AlignedFaces`` (what a loader worker runs per image; the landmarks are the template's, moved into the
  photo: the warp costs the same wherever they are), and a large real photo (the 1280x886 group photo)
  for the worst case;
* the 1:1 scoring on synthetic features of the real size (469,375 x 512 float32 image features with their
  flips, 23,124 templates of about 20 images in media of 1 to 5, 15,658,489 pairs between random
  templates): ``validation_ijb.protocol``'s image features (N1 D1 F1), template pooling, pair scores and
  ROC with TAR@FAR, each timed;
* the GPU's extraction rate (images/s with flips) from a ``scripts/gpu_check.sh`` report, else
  ``--gpu-images-per-s`` (a stated assumption).

The projection for a machine with ``--cores`` cores: decode + alignment on all cores but one (the one
feeding the GPU), overlapped with the GPU's extraction (the loader runs while the GPU embeds; the longer
of the two counts), then the scoring as measured here (its matrix products would run faster on more
cores, so this is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.fileio import write_json
from core.paths import shared_data_dir
from core.threads import load_average
from face_alignment.align import ARCFACE_TEMPLATE
from validation_ijb.dataset import AlignedFaces
from validation_ijb.protocol import Mode, image_features, pair_scores, template_features, verification

IJBC_IMAGES = 469_375
IJBC_TEMPLATES = 23_124
IJBC_PAIRS = 15_658_489
IJBC_GENUINE = 19_557
# Assumed when no GPU figure is at hand: r100 in bf16 at 6,000 images/s with their flips (12,000 forward
# passes/s, 290 TFLOP/s, 30% of an H100's dense bf16 peak), stated beside the result.
ASSUMED_GPU_IMAGES_PER_S = 6000.0


def photo_landmarks(height: int, width: int) -> np.ndarray:
    """The template's five points scaled and centred into a ``height`` x ``width`` photo (a face filling
    about 60% of it): the alignment warps the same number of pixels wherever the points are."""
    scale = 0.6 * min(height, width) / 112
    return (ARCFACE_TEMPLATE - 56.0) * scale + np.array([width / 2, height / 2])


def decode_align_rate(paths: Sequence[Path], repeat: int = 1) -> dict[str, Any]:
    """Reading, decoding and aligning ``paths`` (``repeat`` times) in this process with one OpenCV thread:
    images/s of wall time, and per CPU-second (``images_per_s_per_core``: what one free core does, however
    busy this machine is)."""
    first = cv2.imread(str(paths[0]))
    landmarks = np.stack([photo_landmarks(*first.shape[:2])] * len(paths))
    faces = AlignedFaces(paths, landmarks)
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        faces[0]  # warm-up (file cache, OpenCV's tables)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeat):
            for i in range(len(faces)):
                faces[i]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    finally:
        cv2.setNumThreads(before)
    count = len(paths) * repeat
    return {"images": count, "photo": f"{first.shape[1]}x{first.shape[0]}", "seconds": seconds,
            "cpu_seconds": cpu_seconds, "images_per_s": count / seconds,
            "images_per_s_per_core": count / max(cpu_seconds, 1e-9)}  # fmt: skip


def synthetic_ijbc(
    images: int, templates: int, pairs: int, genuine: int, dim: int = 512, seed: int = 0
) -> dict[str, np.ndarray]:
    """Image features (and flips), faceness, template and media ids, and 1:1 pairs of the given sizes:
    each template's images in consecutive media of 1 to 5 images."""
    rng = np.random.default_rng(seed)
    template_of = np.sort(rng.integers(0, templates, images))
    template_of[:templates] = np.arange(templates)  # every template has an image
    template_of.sort()
    media = np.cumsum(np.r_[True, (template_of[1:] != template_of[:-1]) | (rng.random(images - 1) < 0.4)])
    original = rng.standard_normal((images, dim), dtype=np.float32)
    flipped = original + 0.1 * rng.standard_normal((images, dim), dtype=np.float32)
    t1 = rng.integers(0, templates, pairs)
    t2 = (t1 + rng.integers(1, templates, pairs)) % templates  # never the same template
    labels = np.zeros(pairs, dtype=np.int64)
    labels[rng.choice(pairs, genuine, replace=False)] = 1
    faceness = rng.uniform(0.5, 1.0, images).astype(np.float32)
    return {"original": original, "flipped": flipped, "faceness": faceness, "templates": template_of,
            "medias": media, "t1": t1, "t2": t2, "labels": labels}  # fmt: skip


def time_scoring(data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Seconds of each step of validation_ijb's 1:1 scoring under N1 D1 F1, and the TAR@FAR it gave."""
    mode = Mode(norm_score=True, detector_score=True, flip=True)
    times = [time.perf_counter()]
    feats = image_features(data["original"], data["flipped"], data["faceness"], mode)
    times.append(time.perf_counter())
    ids, pooled = template_features(feats, data["templates"], data["medias"])
    times.append(time.perf_counter())
    del feats
    scores = pair_scores(ids, pooled, data["t1"], data["t2"])
    times.append(time.perf_counter())
    result = verification(scores, data["labels"])
    times.append(time.perf_counter())
    names = ("image_features_s", "template_pooling_s", "pair_scores_s", "roc_tar_at_far_s")
    steps = {name: after - before for name, before, after in zip(names, times, times[1:], strict=False)}
    return {**steps, "total_s": times[-1] - times[0], "templates": len(ids), "pairs": len(scores),
            "tar_at_far_1e-4": result["tar_at_far"][1e-4]}  # fmt: skip


def gpu_rate(path: Path | None, given: float | None) -> tuple[float, str]:
    """(images/s with flips on the GPU, where the figure comes from)."""
    if path is not None:
        report = json.loads(path.read_text())
        try:
            part = report["parts"]["extraction"]
            rate = float(part["figures"]["images_per_s_with_flip"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: no parts.extraction.figures.images_per_s_with_flip (a gpu_check.json "
                             "of a run with its extraction part)") from None  # fmt: skip
        settings = part.get("settings", {})
        what = f"{settings.get('backbone', '?')} {settings.get('precision', '?')}"
        return rate, f"measured by scripts/gpu_check.sh ({path}: {what}, {report.get('device', '?')})"
    if given is not None:
        return given, "given with --gpu-images-per-s"
    return ASSUMED_GPU_IMAGES_PER_S, "assumed: r100 bf16 at 6,000 images/s with flips (30% MFU on an H100)"


def project(decode: float, scoring_s: float, gpu: float, cores: int, images: int) -> dict[str, Any]:
    """Seconds of a whole evaluation: decode + align on ``cores - 1`` cores overlapped with the GPU, then
    the scoring."""
    decode_s = images / (decode * max(1, cores - 1))
    extract_s = images / gpu
    total = max(decode_s, extract_s) + scoring_s
    return {"cores": cores, "decode_align_s": decode_s, "extraction_s": extract_s,
            "bottleneck": "decode + alignment" if decode_s > extract_s else "GPU extraction",
            "scoring_s": scoring_s, "total_s": total, "minutes": total / 60}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=shared_data_dir() / "lfw_color150",
                   help="folder of loose face crops (JPEG) to decode and align (default: LFW's)")  # fmt: skip
    p.add_argument("--large-photo", type=Path, default=shared_data_dir() / "extras" / "images" / "t1.jpg")
    p.add_argument("--count", type=int, default=1000, help="photos decoded and aligned (default 1000)")
    p.add_argument("--images", type=int, default=IJBC_IMAGES)
    p.add_argument("--templates", type=int, default=IJBC_TEMPLATES)
    p.add_argument("--pairs", type=int, default=IJBC_PAIRS)
    p.add_argument("--genuine", type=int, default=IJBC_GENUINE)
    p.add_argument("--cores", type=int, default=16, help="cores of the machine projected for (default 16)")
    p.add_argument("--gpu-check", type=Path, help="gpu_check.json whose extraction rate to use")
    p.add_argument("--gpu-images-per-s", type=float, help="the GPU's extraction rate, images/s with flips")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = sorted(args.photos.glob("*.jpg"))[: args.count]
    if not paths:
        print(f"bench_ijbc: no .jpg photos in {args.photos}", file=sys.stderr)
        return 2
    try:
        gpu, gpu_source = gpu_rate(args.gpu_check, args.gpu_images_per_s)
    except (OSError, ValueError) as err:
        print(f"bench_ijbc: {err}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"load_average_at_start": load_average()}
    report["decode_align"] = decode_align_rate(paths)
    if args.large_photo.is_file():
        report["decode_align_large"] = decode_align_rate([args.large_photo], repeat=max(1, args.count // 20))
    data = synthetic_ijbc(args.images, args.templates, args.pairs, args.genuine)
    report["scoring"] = time_scoring(data)
    del data
    report["gpu_images_per_s"], report["gpu_source"] = gpu, gpu_source
    report["projection"] = project(report["decode_align"]["images_per_s_per_core"],
                                   report["scoring"]["total_s"], gpu, args.cores, args.images)  # fmt: skip
    report["load_average_at_end"] = load_average()
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def format_report(r: dict[str, Any]) -> str:
    d, s, p = r["decode_align"], r["scoring"], r["projection"]
    lines = [
        f"load average {r['load_average_at_start']:.1f} at the start, {r['load_average_at_end']:.1f} at "
        "the end",
        f"decode + align, one core: {d['images_per_s_per_core']:.0f} images per CPU-second, "
        f"{d['images_per_s']:.0f} images/s of wall time here ({d['images']} {d['photo']} photos)",
    ]  # fmt: skip
    if "decode_align_large" in r:
        big = r["decode_align_large"]
        lines.append(
            f"decode + align, one core, a {big['photo']} photo: {big['images_per_s_per_core']:.0f} images "
            "per CPU-second"
        )
    lines += [
        f"1:1 scoring of {s['pairs']:,} pairs over {s['templates']:,} templates (N1D1F1): image features "
        f"{s['image_features_s']:.1f} s, template pooling {s['template_pooling_s']:.1f} s, pair scores "
        f"{s['pair_scores_s']:.1f} s, ROC + TAR@FAR {s['roc_tar_at_far_s']:.1f} s = {s['total_s']:.1f} s",
        f"GPU extraction: {r['gpu_images_per_s']:,.0f} images/s with flips ({r['gpu_source']})",
        f"projected IJB-C on {p['cores']} cores + the GPU: decode + align {p['decode_align_s']:.0f} s "
        f"(on {p['cores'] - 1} cores) beside extraction {p['extraction_s']:.0f} s -> {p['bottleneck']} "
        f"bound, + scoring {p['scoring_s']:.0f} s = {p['total_s']:.0f} s ({p['minutes']:.1f} min)",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
