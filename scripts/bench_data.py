"""Benchmark the RecordIO data path: random record reads, and decode (+ augment) through a DataLoader.

Builds a temporary InsightFace-layout rec of ``--images`` 112x112 JPEGs (the CelebA crops of the shared
data folder when present, cycled as needed, otherwise synthetic faces), then prints:

* records/s of random-access reads with :class:`data.recordio.RecordIOFaceSet` (bytes + label);
* images/s through a ``torch.utils.data.DataLoader`` that decodes to RGB uint8 and augments, for each
  ``--workers`` count (0, 1, 2 by default); worker start-up is reported separately. The batch is collated
  as training collates it (``data.transforms.collate_faces``: numpy, outside PyTorch's intra-op pool;
  ``--collate torch`` times ``default_collate``'s ``torch.stack`` instead) and workers start through
  ``core.threads.loader_worker_init``;
* with ``--busy N``, every loader row again beside N CPU-bound processes (``python -c "while True: pass"``),
  as on a shared server or a laptop doing other work;
* with ``--mxnet-python PATH``, the same random reads done by MXNet's ``MXIndexedRecordIO`` in that
  interpreter (a virtual environment with ``mxnet``), on the same file and key order.

Usage::

    python -m scripts.bench_data [--images 5000] [--reads 20000] [--workers 0 1 2] [--json]
    python -m scripts.bench_data --workers 0 --busy 1 [--collate torch]
    python -m scripts.bench_data --mxnet-python /tmp/mxvenv/bin/python

(run from the repository root, as a module, so that ``core`` and ``data`` import).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from core.paths import shared_data_dir
from core.threads import fork_safe_opencv, loader_worker_init
from data.recordio import RecordIOFaceSet, RecordIOWriter, pack
from data.transforms import PRESETS, FaceDataset, FaceTransform, collate_faces
from scripts.bench_support import busy_processes

# Runs inside the MXNet interpreter: argv = rec, idx, keys file; prints one JSON line.
MXNET_READER = """
import json, sys, time
import mxnet as mx
rec, idx, keys_file = sys.argv[1:4]
keys = [int(k) for k in open(keys_file).read().split()]
reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
start = time.perf_counter()
total = 0
for key in keys:
    header, image = mx.recordio.unpack(reader.read_idx(key))
    total += len(image)
seconds = time.perf_counter() - start
print(json.dumps({"mxnet": mx.__version__, "reads": len(keys), "seconds": seconds, "bytes": total}))
"""


# --------------------------------------------------------------------------------------------------
# Building the benchmark file
# --------------------------------------------------------------------------------------------------


def face_jpegs(count: int, seed: int) -> tuple[list[tuple[int, bytes]], str]:
    """``count`` (label, JPEG bytes) pairs grouped by label, and where they came from."""
    faces = shared_data_dir() / "celeba_aligned112"
    people = sorted(p for p in faces.iterdir() if p.is_dir()) if faces.is_dir() else []
    if people:
        pool = [(label, f.read_bytes()) for label, d in enumerate(people) for f in sorted(d.glob("*.jpg"))]
        source = f"CelebA crops from {faces} ({len(pool)} files, cycled)"
    else:
        pool = [(i // 20, synthetic_face(seed + i)) for i in range(min(count, 2000))]
        source = "synthetic 112x112 JPEGs (no shared data found)"
    # Cycling the pool: every pass gets fresh labels so identities stay contiguous.
    classes = max(label for label, _ in pool) + 1
    items = [
        (pool[i % len(pool)][0] + classes * (i // len(pool)), pool[i % len(pool)][1]) for i in range(count)
    ]
    return items, source


def synthetic_face(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.resize(
        rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC
    )
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def write_face_rec(prefix: Path, items: list[tuple[int, bytes]]) -> Path:
    """InsightFace layout: meta header, images 1..N, one record per identity."""
    num_images = len(items)
    labels = [label for label, _ in items]
    classes = sorted(set(labels))
    with RecordIOWriter(prefix.with_suffix(".rec")) as writer:
        writer.write(0, pack([num_images + 1, num_images + 1 + len(classes)], b""))
        for key, (label, jpeg) in enumerate(items, start=1):
            writer.write(key, pack(label, jpeg, id=key))
        starts = np.searchsorted(labels, classes)
        ends = np.append(starts[1:], num_images)
        for row, (first, end) in enumerate(zip(starts, ends, strict=True)):
            key = num_images + 1 + row
            writer.write(key, pack([int(first) + 1, int(end) + 1], b"", id=key))
    return prefix.with_suffix(".rec")


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def bench_random_reads(rec: Path, order: list[int]) -> dict[str, float]:
    faces = RecordIOFaceSet(rec)
    faces[0]  # open the mmap outside the timing
    start = time.perf_counter()
    total = sum(len(faces[i][0]) for i in order)
    seconds = time.perf_counter() - start
    return {
        "reads": len(order),
        "seconds": seconds,
        "records_per_s": len(order) / seconds,
        "mb_per_s": total / seconds / 1e6,
    }


def bench_mxnet_reads(python: str, rec: Path, order: list[int], workdir: Path) -> dict[str, float]:
    keys_file = workdir / "keys.txt"
    keys_file.write_text("\n".join(str(i + 1) for i in order))
    done = subprocess.run(
        [python, "-c", MXNET_READER, str(rec), str(rec.with_suffix(".idx")), str(keys_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} failed to run the MXNet reader:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["records_per_s"] = result["reads"] / result["seconds"]
    result["mb_per_s"] = result["bytes"] / result["seconds"] / 1e6
    return result


def face_dataset(rec: Path, preset: str) -> FaceDataset:
    """RecordIO faces decoded and augmented exactly as training sees them (uint8 3 x H x W)."""
    return FaceDataset(RecordIOFaceSet(rec), FaceTransform(PRESETS[preset], seed=0))


COLLATES = {"numpy": collate_faces, "torch": torch.utils.data.default_collate}


def bench_loader(
    rec: Path, workers: int, batch_size: int, preset: str, collate: str = "numpy"
) -> dict[str, float]:
    """One shuffled epoch; throughput counts from the first batch on, so worker start-up is separate."""
    if workers > 0:
        fork_safe_opencv()
    loader = torch.utils.data.DataLoader(
        face_dataset(rec, preset), batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False,
        collate_fn=COLLATES[collate], worker_init_fn=loader_worker_init,
    )  # fmt: skip
    start = time.perf_counter()
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(loader)
    first = next(batches)
    assert first[0].dtype == torch.uint8 and first[0].shape[1:] == (3, 112, 112)
    ready = time.perf_counter()
    count = sum(len(images) for images, _ in batches)
    seconds = time.perf_counter() - ready
    return {
        "preset": preset,
        "workers": workers,
        "collate": collate,
        "images": count + len(first[0]),
        "startup_s": ready - start,
        "images_per_s": count / seconds if count else float("nan"),
    }


def bench_loaders(args: argparse.Namespace, rec: Path) -> list[dict]:
    """Every loader row (preset x workers), alone and, with ``--busy``, beside busy processes."""
    rows = [
        bench_loader(rec, w, args.batch_size, preset, args.collate)
        for preset in args.presets
        for w in args.workers
    ]
    if args.busy:
        with busy_processes(args.busy):
            for row in rows:
                busy = bench_loader(rec, row["workers"], args.batch_size, row["preset"], args.collate)
                row["busy_processes"] = args.busy
                row["busy_images_per_s"] = busy["images_per_s"]
    return rows


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images in the benchmark rec")
    parser.add_argument("--reads", type=int, default=20000, help="random reads to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["arcface", "adaface"],
        choices=sorted(PRESETS),
        help="augmentation presets to time (arcface: flip only; adaface: + crop, low-res, photometric)",
    )
    parser.add_argument("--mxnet-python", help="interpreter with mxnet installed, to time MXIndexedRecordIO")
    parser.add_argument(
        "--collate", choices=sorted(COLLATES), default="numpy",
        help="numpy: data.transforms.collate_faces, as training collates (default); torch: default_collate",
    )  # fmt: skip
    parser.add_argument(
        "--busy", type=int, default=0, metavar="N",
        help="also time every loader row beside N CPU-bound processes (default: 0, alone only)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        items, source = face_jpegs(args.images, args.seed)
        rec = write_face_rec(Path(tmp) / "bench", items)
        order = rng.integers(0, args.images, args.reads).tolist()
        report: dict = {
            "images": args.images,
            "source": source,
            "rec_bytes": rec.stat().st_size,
            "cpus": os.cpu_count(),
            "pipeline": "data.decode.decode_rgb + data.transforms.FaceTransform",
            "random_reads": bench_random_reads(rec, order),
        }
        if args.mxnet_python:
            report["mxnet_random_reads"] = bench_mxnet_reads(args.mxnet_python, rec, order, Path(tmp))
        report["torch_threads"] = torch.get_num_threads()
        report["loader"] = bench_loaders(args, rec)
    print(json.dumps(report) if args.json else format_report(report))
    return report


def format_report(report: dict) -> str:
    """The report as a few aligned lines."""
    size_mb = report["rec_bytes"] / 1e6
    lines = [
        f"rec: {report['images']} images, {size_mb:.1f} MB; {report['source']}; {report['cpus']} CPUs",
        f"decode/augment: {report['pipeline']}",
    ]
    reads = [("data.recordio", report["random_reads"])]
    if "mxnet_random_reads" in report:
        reads.append((f"mxnet {report['mxnet_random_reads']['mxnet']}", report["mxnet_random_reads"]))
    for name, r in reads:
        lines.append(
            f"random reads, {name:<13}: {r['records_per_s']:>9.0f} records/s ({r['mb_per_s']:.0f} MB/s)"
        )
    lines.append(f"DataLoader: {report['torch_threads']} torch threads in the main process")
    for row in report["loader"]:
        busy = ""
        if "busy_images_per_s" in row:
            busy = f"; beside {row['busy_processes']} busy: {row['busy_images_per_s']:>8.0f} images/s"
        lines.append(
            f"DataLoader decode+augment ({row['preset']}), {row['workers']} workers, {row['collate']} "
            f"collate: {row['images_per_s']:>8.0f} images/s (start-up {row['startup_s']:.2f} s){busy}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
