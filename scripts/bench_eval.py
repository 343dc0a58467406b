"""Evaluation speed and memory: the extractor's images/s and the seconds of a whole LFW-size .bin evaluation.

    python -m scripts.bench_eval                             # mbf (untrained), lfw_yunet112.bin, CPU (+ GPU)
    python -m scripts.bench_eval --backbone r50 --limit 200  # 200 of the pairs only
    python -m scripts.bench_eval --model model.pt --backbone r100 --devices cuda --precisions fp32 bf16
    python -m scripts.bench_eval --model mobilefacenet.onnx --color bgr --devices cpu
    python -m scripts.bench_eval --backbone r50 --limit 100 --threads 1 2 --busy 1   # beside a busy process

For each device (CPU, and CUDA when present) and precision it prints:

* the whole evaluation as ``validation_hq`` runs it, first, while the process holds nothing else: load +
  decode, extract (with flips, ``--whole-batch`` images per batch, the evaluator's 128 by default), score
  (10-fold accuracy, VAL@FAR), in seconds, with the accuracy and the peak resident memory of those steps
  (the kernel's high-water mark, reset before them);
* on the CPU, the runtimes side by side on one batch (``--compare-batch``, 64) in the same process with the
  same threads (each of ``--threads``): PyTorch eager (the model as it is, the batch in one pass), the
  framework's fast path (``TorchEmbedder``: BatchNorm folded, slices of 32 images) and onnxruntime on an
  export of the same weights
  (``scripts.export_onnx``), as ``OnnxEmbedder`` runs it and with onnxruntime's defaults (memory arena,
  the batch in one run); images/s (best and median of
  ``--repeats`` interleaved rounds), and each one's largest feature difference from eager. An ONNX
  ``--model`` has the onnxruntime rows only. With ``--busy N`` every row is timed again beside N CPU-bound
  processes;
* ``.bin`` decoding: seconds and images/s of ``data.verification.load_bin`` with 0, 2, 4 ... threads;
* the extractor (``evaluation.extract.extract`` on decoded images held in memory): images/s with and without
  the flipped copies, per batch size (an image with its flip costs two forward passes);
* the multi-worker loader (``evaluation.extract.extract_dataset`` over the encoded images, decoded in loader
  processes): images/s per number of workers, flips included;
* peak memory: the process's maximum resident set size so far (``resource``; it only grows) and, on a GPU,
  ``torch.cuda.max_memory_allocated`` of that run.

Without ``--model`` the backbone is randomly initialised (BatchNorm statistics taken from 16 faces): the
timings hold, the accuracy is near chance.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones import build_backbone
from core.fileio import write_json
from core.paths import shared_data_dir
from core.threads import load_average, use_threads
from data.decode import decode_rgb
from data.transforms import normalize_batch
from data.verification import load_bin, read_bin_raw, write_bin
from evaluation.embedders import OnnxEmbedder, TorchEmbedder, load_embedder, session_options
from evaluation.extract import extract, extract_dataset
from evaluation.folding import largest_difference
from evaluation.verification import verification_results
from scripts.bench_support import busy_processes, peak_rss_mib, reset_peak_rss, rss_mib
from scripts.export_onnx import export


class EncodedImages(torch.utils.data.Dataset):
    """Encoded face images decoded in the loader (what an evaluation over image files does per item)."""

    def __init__(self, encoded: Sequence[bytes]) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_rgb(self.encoded[i], f"image {i}").transpose(2, 0, 1)


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
    """validation_hq's evaluation of one .bin, step by step, with the peak resident memory of the steps."""
    gc.collect()
    rss_before, reset = rss_mib(), reset_peak_rss()
    load_s, val = timed(lambda: load_bin(path, workers=workers), device)
    extract_s, (original, flipped) = timed(lambda: extract(embed, val.images, batch, flip=True), device)
    score_s, metrics = timed(lambda: verification_results(original, flipped, val.issame), device)
    return {"pairs": val.pairs, "batch": batch, "load_decode_s": load_s, "extract_s": extract_s,
            "score_s": score_s, "total_s": load_s + extract_s + score_s, "accuracy": metrics["accuracy"],
            "accuracy_std": metrics["accuracy_std"], "decoded_mib": val.images.nbytes / 2**20,
            "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
            "peak_of": "these steps" if reset else "the process so far"}  # fmt: skip


# ------------------------------------------------------------------------------------ runtimes side by side


def runtimes(embed, scratch: Path, threads: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The embedders compared on the CPU: PyTorch eager, the fast path and onnxruntime on an export of the
    same weights, as the framework runs it (no memory arena, slices of 32 images) and with its defaults
    (arena, the batch in one run); an ONNX model has the onnxruntime rows only."""
    import onnxruntime

    if isinstance(embed, OnnxEmbedder):
        path, color, scaling = embed.path, embed.color, (embed.scaling.mean, embed.scaling.std)
    else:
        path, color, scaling = scratch / "model.onnx", embed.color, (None, None)
        if not path.exists():
            export(embed, path, fold=False)
    ort = OnnxEmbedder(path, color, *scaling, verbose=False, threads=threads)
    ort_arena = OnnxEmbedder(path, color, *scaling, verbose=False, threads=threads)
    ort_arena.session = onnxruntime.InferenceSession(
        str(path), session_options(threads, arena=True), providers=["CPUExecutionProvider"]
    )
    ort_arena.cpu_batch = 1 << 30  # the whole batch in one run: onnxruntime as its defaults run it
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if isinstance(embed, TorchEmbedder):
        model, size = embed.model, embed.input_size
        found["pytorch eager"] = TorchEmbedder(model, embed.color, "cpu", input_size=size, fast=False)
        found["pytorch eager"].cpu_batch = 1 << 30  # the model as it is, the batch in one pass
        found["fast path"] = TorchEmbedder(model, embed.color, "cpu", input_size=size, fast=True)
    found["onnxruntime"] = ort
    found["onnxruntime (defaults)"] = ort_arena
    return found


def compare_runtimes(
    embed, images: torch.Tensor, threads: Sequence[int], repeats: int, busy: int, scratch: Path
) -> list[dict[str, Any]]:
    """images/s of each runtime of :func:`runtimes` on the batch ``images`` with each thread count (rounds
    interleaved, so a change in the machine's load reaches them all), alone and beside ``busy`` processes."""
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            candidates = runtimes(embed, scratch, n)
            setup, features = {}, {}
            for name, run in candidates.items():  # warm-up; the fast path folds here
                setup[name], features[name] = timed(lambda run=run: run(images), torch.device("cpu"))
            reference = next(iter(features.values()))
            for busy_now in (0, busy) if busy else (0,):
                with busy_processes(busy_now):
                    seconds: dict[str, list[float]] = {name: [] for name in candidates}
                    for _ in range(repeats):
                        for name, run in candidates.items():
                            seconds[name].append(timed(lambda run=run: run(images), torch.device("cpu"))[0])
                for name, run in candidates.items():
                    rows.append({
                        "runtime": name, "threads": n, "batch": len(images), "busy_processes": busy_now,
                        "images_per_s": len(images) / min(seconds[name]),
                        "median_images_per_s": len(images) / statistics.median(seconds[name]),
                        "first_call_s": setup[name],
                        "difference": largest_difference(features[name], reference),
                        "fast_path": getattr(run, "fast_path", None),
                    })  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return rows


def decoded(path: Path, count: int) -> np.ndarray:
    """The first ``count`` images of a .bin, decoded (uint8 RGB N x 3 x H x W)."""
    encoded = read_bin_raw(path)[0][:count]
    return np.stack([decode_rgb(b, f"{path} image {i}").transpose(2, 0, 1) for i, b in enumerate(encoded)])


def run_device(
    args: argparse.Namespace, device: str, precision: str, path: Path, scratch: Path
) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    embed = make_embedder(args, device, precision, decoded(path, 16))
    result: dict[str, Any] = {
        "device": device if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "precision": embed.precision,
        "threads": torch.get_num_threads(),
        "whole": bench_whole(embed, path, args.whole_batch, max(args.workers), dev),
    }
    result["fast_path"] = getattr(embed, "fast_path", None)
    images = decoded(path, args.speed_images)
    if dev.type == "cpu" and embed.precision == "fp32" and isinstance(embed, (TorchEmbedder, OnnxEmbedder)):
        batch = torch.from_numpy(np.resize(images, (args.compare_batch, *images.shape[1:])))
        result["runtimes"] = compare_runtimes(
            embed, batch, args.threads or [torch.get_num_threads()], args.repeats, args.busy, scratch
        )
    encoded = read_bin_raw(path)[0][: args.speed_images]
    result["extractor"] = bench_extractor(embed, images, args.batch_sizes, dev)
    result["loader"] = bench_loader(embed, encoded, max(args.batch_sizes), args.workers, dev)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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


def format_runtimes(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["runtimes side by side (one batch):  threads  busy  images/s (best, median)  first call  "
             "difference"]  # fmt: skip
    for r in rows:
        note = f"  {r['fast_path']}" if r["fast_path"] and r["runtime"] == "fast path" else ""
        lines.append(
            f"  {r['runtime']:<22} batch {r['batch']:<4} {r['threads']:>5} {r['busy_processes']:>5}"
            f"  {r['images_per_s']:>8.1f} {r['median_images_per_s']:>8.1f}     {r['first_call_s']:>6.2f} s"
            f"  {r['difference']:.1e}{note}"
        )
    groups: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["threads"], r["busy_processes"]), {})[r["runtime"]] = r["median_images_per_s"]
    for (threads, busy), speeds in groups.items():
        best_ort = max(v for k, v in speeds.items() if k.startswith("onnxruntime"))
        if "fast path" in speeds:
            fast, eager = speeds["fast path"] / best_ort, speeds["pytorch eager"] / best_ort
            lines.append(f"  fast path / best onnxruntime ({threads} threads, {busy} busy, medians): "
                         f"{fast:.2f}x; eager {eager:.2f}x")  # fmt: skip
    return lines


def format_run(run: dict[str, Any]) -> str:
    w = run["whole"]
    lines = [f"== {run['device']}, {run['precision']}, {run['threads']} threads ==",
             f"whole .bin evaluation ({w['pairs']} pairs, batch {w['batch']}): load+decode "
             f"{w['load_decode_s']:.2f} s, extract {w['extract_s']:.2f} s, score {w['score_s']:.2f} s = "
             f"{w['total_s']:.2f} s; accuracy {w['accuracy'] * 100:.2f} ± {w['accuracy_std'] * 100:.2f}",
             f"whole evaluation memory: peak RSS {w['peak_rss_mib']:.0f} MiB of {w['peak_of']} (process at "
             f"{w['rss_before_mib']:.0f} MiB before; decoded images {w['decoded_mib']:.0f} MiB)"]  # fmt: skip
    if run.get("fast_path"):
        lines.append(f"extraction path: {run['fast_path']}")
    if "runtimes" in run:
        lines += format_runtimes(run["runtimes"])
    lines.append("extractor (images in memory):  batch  flip   images/s  forwards/s")
    for r in run["extractor"]:
        lines.append(f"{'':31}{r['batch']:>6}  {'yes' if r['flip'] else 'no':>4} {r['images_per_s']:>10.1f}"
                     f" {r['forwards_per_s']:>11.1f}")  # fmt: skip
    loader = ", ".join(f"{r['workers']} workers {r['images_per_s']:.1f} img/s" for r in run["loader"])
    lines.append(f"loader (decode in workers, flip): {loader}")
    memory = f"peak RSS of the whole benchmark process {run['peak_rss_mib']:.0f} MiB"
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
    p.add_argument("--whole-batch", type=int, default=128, help="batch of the whole evaluation (default 128)")
    p.add_argument("--compare-batch", type=int, default=64, help="batch of the runtimes side by side")
    p.add_argument("--threads", type=int, nargs="+", help="thread counts of the runtimes side by side "
                   "(default: core.threads.thread_count(), chosen at the start)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the runtimes side by side")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="also time the runtimes beside N CPU-bound processes")  # fmt: skip
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2, 4], help="decode threads / loader workers"
    )
    p.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    p.add_argument("--precisions", nargs="+", help="default: fp32 on CPU; fp32 and bf16 on GPU")
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    use_threads("batched")
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    with tempfile.TemporaryDirectory() as tmp:
        path = limited_bin(args.bin, args.limit, Path(tmp))
        report: dict[str, Any] = {
            "model": str(args.model) if args.model else f"{args.backbone} (random weights)",
            "bin": str(args.bin),
            "pairs": len(read_bin_raw(path)[1]),
            "threads": torch.get_num_threads(),
            "load_average": load_average(),
            "runs": [],
        }
        runs = []
        for device in devices:
            precisions = args.precisions or (["fp32"] if device == "cpu" else ["fp32", "bf16"])
            for precision in precisions:
                runs.append(run_device(args, device, precision, path, Path(tmp)))
                print(format_run(runs[-1]), flush=True)
        report["runs"] = runs
        report["decode"] = bench_decode(path, args.workers)
        print(format_header(report), flush=True)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
