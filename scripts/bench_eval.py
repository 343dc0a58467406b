"""Evaluation speed and memory: the extractor's images/s and the seconds of a whole LFW-size .bin evaluation.

    python -m scripts.bench_eval                             # mbf (untrained), lfw_yunet112.bin, CPU (+ GPU)
    python -m scripts.bench_eval --backbone r50 --limit 200  # 200 of the pairs only
    python -m scripts.bench_eval --model model.pt --backbone r100 --devices cuda --precisions fp32 bf16
    python -m scripts.bench_eval --model mobilefacenet.onnx --color bgr --devices cpu

For each device (CPU, and CUDA when present) and precision it prints:

* ``.bin`` decoding: seconds and images/s of ``data.verification.load_bin`` with 0, 2, 4 ... threads;
* the extractor (``evaluation.extract.extract`` on decoded images held in memory): images/s with and without
  the flipped copies, per batch size (an image with its flip costs two forward passes);
* the multi-worker loader (``evaluation.extract.extract_dataset`` over the encoded images, decoded in loader
  processes): images/s per number of workers, flips included;
* the whole evaluation as ``validation_hq`` runs it: load + decode, extract (with flips), score (10-fold
  accuracy, VAL@FAR), in seconds, with the accuracy;
* peak memory: the process's maximum resident set size so far (``resource``; it only grows) and, on a GPU,
  ``torch.cuda.max_memory_allocated`` of that run.

Without ``--model`` the backbone is randomly initialised (BatchNorm statistics taken from 16 faces): the
timings hold, the accuracy is near chance.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones import build_backbone
from core.fileio import atomic_write
from core.paths import shared_data_dir
from data.decode import decode_rgb
from data.transforms import normalize_batch
from data.verification import load_bin, read_bin_raw, write_bin
from evaluation.embedders import TorchEmbedder, load_embedder
from evaluation.extract import extract, extract_dataset
from evaluation.verification import verification_results


class EncodedImages(torch.utils.data.Dataset):
    """Encoded face images decoded in the loader (what an evaluation over image files does per item)."""

    def __init__(self, encoded: Sequence[bytes]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_rgb(self.encoded[i], f"image {i}").transpose(2, 0, 1)


def peak_rss_mib() -> float:
    """The process's maximum resident set size so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def make_embedder(args: argparse.Namespace, device: str, precision: str, faces: np.ndarray):
    """The model of ``--model``, or a randomly initialised ``--backbone`` whose BatchNorm statistics are
    measured on ``faces`` (with the default ones a deep random network's features overflow float32)."""
    if args.model:
        return load_embedder(args.model, args.backbone, args.color, device, precision)
    torch.manual_seed(0)
    model = build_backbone(args.backbone)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(normalize_batch(torch.from_numpy(faces), args.color or "rgb"))
    return TorchEmbedder(model, args.color or "rgb", device, precision=precision)


def limited_bin(path: Path, limit: int | None, folder: Path) -> Path:
    """``path`` itself, or a copy holding ``limit`` of its pairs, evenly spaced through the file (the sets
    are stored fold by fold, same-person pairs first, so the first pairs alone would all be positive)."""
    if not limit:
        return path
    images, issame = read_bin_raw(path)
    if limit >= len(issame):
        return path
    keep = np.linspace(0, len(issame) - 1, limit).round().astype(int)
    out = folder / f"{path.stem}.bin"
    write_bin(out, [images[j] for k in keep for j in (2 * k, 2 * k + 1)], issame[keep].tolist())
    return out


def bench_decode(path: Path, workers: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for w in workers:
        start = time.perf_counter()
        val = load_bin(path, workers=w)
        seconds = time.perf_counter() - start
        rows.append({"threads": w, "seconds": seconds, "images_per_s": len(val.images) / seconds})
    return rows


def bench_extractor(
    embed, images: np.ndarray, batch_sizes: Sequence[int], device: torch.device
) -> list[dict]:
    rows = []
    extract(embed, images[: min(batch_sizes)], min(batch_sizes), flip=False)  # warm-up (kernels, allocator)
    for batch in batch_sizes:
        for flip in (False, True):
            seconds, _ = timed(lambda b=batch, f=flip: extract(embed, images, b, flip=f), device)
            rows.append({"batch": batch, "flip": flip, "seconds": seconds,
                         "images_per_s": len(images) / seconds,
                         "forwards_per_s": len(images) * (2 if flip else 1) / seconds})  # fmt: skip
    return rows


def bench_loader(embed, encoded: Sequence[bytes], batch: int, workers: Sequence[int], device) -> list[dict]:
    rows = []
    for w in workers:
        seconds, _ = timed(
            lambda w=w: extract_dataset(embed, EncodedImages(encoded), batch, flip=True, num_workers=w),
            device,
        )
        rows.append({"workers": w, "seconds": seconds, "images_per_s": len(encoded) / seconds})
    return rows


def bench_whole(embed, path: Path, batch: int, workers: int, device: torch.device) -> dict[str, Any]:
    """validation_hq's evaluation of one .bin, step by step."""
    load_s, val = timed(lambda: load_bin(path, workers=workers), device)
    extract_s, (original, flipped) = timed(lambda: extract(embed, val.images, batch, flip=True), device)
    score_s, metrics = timed(lambda: verification_results(original, flipped, val.issame), device)
    return {"pairs": val.pairs, "load_decode_s": load_s, "extract_s": extract_s, "score_s": score_s,
            "total_s": load_s + extract_s + score_s, "accuracy": metrics["accuracy"],
            "accuracy_std": metrics["accuracy_std"]}  # fmt: skip


def run_device(args: argparse.Namespace, device: str, precision: str, path: Path) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    val = load_bin(path, workers=max(args.workers))
    embed = make_embedder(args, device, precision, val.images[: min(16, len(val.images))])
    images = val.images[: args.speed_images]
    encoded = read_bin_raw(path)[0][: args.speed_images]
    result = {
        "device": device if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "precision": embed.precision,
        "extractor": bench_extractor(embed, images, args.batch_sizes, dev),
        "loader": bench_loader(embed, encoded, max(args.batch_sizes), args.workers, dev),
        "whole": bench_whole(embed, path, max(args.batch_sizes), max(args.workers), dev),
        "peak_rss_mib": peak_rss_mib(),
    }
    if dev.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def format_header(report: dict[str, Any]) -> str:
    decode = ", ".join(
        f"{r['threads']} threads {r['seconds']:.2f} s ({r['images_per_s']:.0f} img/s)"
        for r in report["decode"]
    )
    return (
        f"{report['model']}; {report['bin']} ({report['pairs']} pairs); torch threads {report['threads']}\n"
        f"load_bin decode: {decode}"
    )


def format_run(run: dict[str, Any]) -> str:
    lines = [f"== {run['device']}, {run['precision']} ==",
             "extractor (images in memory):  batch  flip   images/s  forwards/s"]  # fmt: skip
    for r in run["extractor"]:
        lines.append(f"{'':31}{r['batch']:>6}  {'yes' if r['flip'] else 'no':>4} {r['images_per_s']:>10.1f}"
                     f" {r['forwards_per_s']:>11.1f}")  # fmt: skip
    loader = ", ".join(f"{r['workers']} workers {r['images_per_s']:.1f} img/s" for r in run["loader"])
    lines.append(f"loader (decode in workers, flip): {loader}")
    w = run["whole"]
    lines.append(
        f"whole .bin evaluation ({w['pairs']} pairs): load+decode {w['load_decode_s']:.2f} s, extract "
        f"{w['extract_s']:.2f} s, score {w['score_s']:.2f} s = {w['total_s']:.2f} s; accuracy "
        f"{w['accuracy'] * 100:.2f} ± {w['accuracy_std'] * 100:.2f}"
    )
    memory = f"peak RSS {run['peak_rss_mib']:.0f} MiB"
    if "cuda_max_allocated_mib" in run:
        memory += f", CUDA max allocated {run['cuda_max_allocated_mib']:.0f} MiB"
    return "\n".join([*lines, memory])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mbf", help="architecture (random weights unless --model)")
    p.add_argument("--model", type=Path, help="a checkpoint, insightface model.pt (with --backbone) or .onnx")
    p.add_argument("--color", choices=("rgb", "bgr"))
    p.add_argument("--bin", type=Path, default=shared_data_dir() / "lfw_yunet112.bin")
    p.add_argument("--limit", type=int, help="use N pairs of the .bin, evenly spaced through it")
    p.add_argument("--speed-images", type=int, default=512, help="images for the extractor/loader rows")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2, 4], help="decode threads / loader workers"
    )
    p.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    p.add_argument("--precisions", nargs="+", help="default: fp32 on CPU; fp32 and bf16 on GPU")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    with tempfile.TemporaryDirectory() as tmp:
        path = limited_bin(args.bin, args.limit, Path(tmp))
        report: dict[str, Any] = {
            "model": str(args.model) if args.model else f"{args.backbone} (random weights)",
            "bin": str(args.bin),
            "pairs": len(read_bin_raw(path)[1]),
            "threads": torch.get_num_threads(),
            "decode": bench_decode(path, args.workers),
            "runs": [],
        }
        print(format_header(report), flush=True)
        for device in devices:
            precisions = args.precisions or (["fp32"] if device == "cpu" else ["fp32", "bf16"])
            for precision in precisions:
                report["runs"].append(run_device(args, device, precision, path))
                print(format_run(report["runs"][-1]), flush=True)
    if args.json:
        with atomic_write(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
