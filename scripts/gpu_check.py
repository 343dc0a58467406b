"""The GPU verdict in one run: what a GPU machine does with this framework, measured in minutes.

    bash scripts/gpu_check.sh [OUT_DIR]
    python -m scripts.gpu_check [--out DIR] [--cpu] [--parts throughput partial_fc ...] [--budget-s 450]

Parts (each guarded: one that fails is reported in the table with its reason, and the others still run):

* ``environment``: torch, CUDA, cuDNN and NCCL versions, the device's name and memory;
* ``throughput``: training images/s per GPU, achieved TFLOP/s, MFU against the device's dense bf16 peak
  (:data:`PEAK_TFLOPS`) and peak memory, for each backbone (r50, r100, mbf, vit_t, vit_b) in each mode:
  fp16 with a GradScaler, bf16, bf16 + channels_last, bf16 + channels_last + ``torch.compile``; the step
  is train.py's (uint8 batch normalised on the device, backbone, Partial FC ArcFace over ``--classes``
  classes, SGD);
  FLOPs counted on the forward pass, a training step taken as 3x forward;
* ``pipeline``: a generated RecordIO of ``--rec-images`` 112x112 JPEGs (written with the framework's
  RecordIO writer) read through the training loader with the machine's cores: images/s alone and while
  training the reference configuration, beside its synthetic-data figure; and GPU JPEG decoding
  (torchvision's ``decode_jpeg`` on the device) against the CPU decoder;
* ``partial_fc``: Partial FC at WebFace42M size (2,059,906 classes, sample rate 0.2) on one device: step
  time and peak memory;
* ``train``: ``torchrun --nproc_per_node=N train.py`` on generated identities for ``--train-steps``
  steps: the loss falls, a checkpoint is written, and a second run resumes from it. N is 2 (NCCL) on a
  machine with two or more GPUs, else 1, which joins no process group: the environment part checks the
  collective library with a one-rank all-reduce (NCCL on a GPU, gloo on a CPU);
* ``extraction``: evaluation extraction images/s (each image and its flip) for r100 in bf16 and the
  projected IJB-C time (469,375 images), with decode + alignment measured separately per CPU core.

Without a CUDA device (or with ``--cpu``) the CPU-sized version runs: mbf only, tiny sizes, gloo, bf16
rows only (no compilation: tests/test_gpu_paths.py proves compiled steps equal eager ones; no fp16, whose
CPU convolutions take a slow path), in about a minute on 2 idle cores; its first
line says so and its figures say nothing about a GPU. The table goes to stdout and every figure, with the
settings that produced it, to ``OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.fileio import write_json
from core.paths import PROJECT_ROOT

IJBC_IMAGES = 469_375
WEBFACE42M_CLASSES = 2_059_906
MS1MV3_CLASSES = 93_431
MODES = ("fp16", "bf16", "bf16_cl", "bf16_cl_compile")
MODE_NAMES = {
    "fp16": "fp16 + GradScaler",
    "bf16": "bf16",
    "bf16_cl": "bf16 + channels_last",
    "bf16_cl_compile": "bf16 + channels_last + compile",
}
PARTS = ("environment", "throughput", "pipeline", "partial_fc", "train", "extraction")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by a pattern of the name
# torch.cuda.get_device_name() gives; the first match wins. fp16 where the device has no bf16.
PEAK_TFLOPS: list[tuple[str, float, str]] = [
    (r"GH200", 989.0, "GH200 bf16 dense"),
    (r"H100.*PCIe", 756.0, "H100 PCIe bf16 dense"),
    (r"H100 NVL", 835.0, "H100 NVL bf16 dense"),
    (r"H100|H800", 989.0, "H100/H800 SXM bf16 dense"),
    (r"H200", 989.0, "H200 bf16 dense"),
    (r"H20\b", 148.0, "H20 bf16 dense"),
    (r"B200", 2250.0, "B200 bf16 dense"),
    (r"A100|A800", 312.0, "A100/A800 bf16 dense"),
    (r"L40S", 362.0, "L40S bf16 dense"),
    (r"L40\b", 181.0, "L40 bf16 dense"),
    (r"\bL4\b", 121.0, "L4 bf16 dense"),
    (r"\bA10\b", 125.0, "A10 bf16 dense"),
    (r"V100", 125.0, "V100 fp16 dense (no bf16)"),
    (r"\bT4\b", 65.0, "T4 fp16 dense (no bf16)"),
]

# The two sizes: the GPU verdict (under 8 minutes on one H100/H200) and the CPU version (about a minute).
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {
        "backbones": ["r50", "r100", "mbf", "vit_t", "vit_b"],
        "modes": list(MODES),
        "batch": 256,
        "steps": 30,
        "warmup": 10,
        "classes": MS1MV3_CLASSES,
        "pfc_classes": WEBFACE42M_CLASSES,
        "pfc_steps": 10,
        "rec_images": 20_000,
        "train_steps": 300,
        "resume_steps": 50,
        "train_batch": 128,
        "train_backbone": "r50",
        "extract_backbone": "r100",
        "extract_images": 8192,
        "extract_batch": 512,
        "align_images": 2000,
        "loader_seconds": 15.0,
        "loader_batches": (1000, 1000),  # reading alone, training: until loader_seconds
    },
    "cpu": {
        "backbones": ["mbf"],
        "modes": list(MODES),
        "batch": 4,
        "steps": 2,
        "warmup": 1,
        "classes": 1000,
        "pfc_classes": 20_000,
        "pfc_steps": 2,
        "rec_images": 256,
        "train_steps": 16,
        "resume_steps": 4,
        "train_batch": 16,
        "train_backbone": "mbf",
        "extract_backbone": "mbf",
        "extract_images": 32,
        "extract_batch": 16,
        "align_images": 50,
        "loader_seconds": 10.0,
        "loader_batches": (16, 3),  # reading alone, training
    },
}
CPU_NO_COMPILE = (
    "not on the CPU version: compiling mbf takes minutes on a few cores; tests/test_gpu_paths.py proves "
    "compiled training and extraction equal eager"
)


CPU_NO_FP16 = (
    "not on the CPU version: fp16 convolutions take a slow path on CPUs (mbf forward + backward about 9x "
    "slower than bf16); the fp16 + GradScaler row is measured on GPUs"
)


class Skipped(Exception):
    """A part or row that does not apply here; the message says why."""


# ------------------------------------------------------------------------------------------ command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="work_dirs/gpu_check", help="folder for gpu_check.json and scratch files")
    p.add_argument("--cpu", action="store_true", help="the CPU-sized version even when a GPU is present")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="time budget: a part or row that would start after it is skipped, with the reason",
    )
    p.add_argument(
        "--backbones", nargs="+", help="throughput backbones (default r50 r100 mbf vit_t vit_b; CPU: mbf)"
    )
    p.add_argument("--modes", nargs="+", choices=MODES, help="throughput modes (default all)")
    p.add_argument("--batch", type=int, help="images per training step (default 256; CPU 4)")
    p.add_argument("--input-size", type=int, default=112, help="network input side")
    p.add_argument("--steps", type=int, help="timed steps per throughput row (default 30; CPU 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10; CPU 1)")
    p.add_argument("--classes", type=int, help="classifier size of the throughput rows (default 93,431)")
    p.add_argument("--pfc-classes", type=int, help="Partial FC classes (default 2,059,906; CPU 20,000)")
    p.add_argument("--pfc-sample-rate", type=float, default=0.2)
    p.add_argument("--rec-images", type=int, help="JPEGs in the generated RecordIO (default 20,000)")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default: the machine's cores)")
    p.add_argument("--train-steps", type=int, help="steps of the torchrun run (default 300; CPU 16)")
    p.add_argument("--extract-images", type=int, help="images timed for extraction (default 8192)")
    p.add_argument("--keep", action="store_true", help="keep the generated data and checkpoints in OUT/work")
    return p


def settings_from(args: argparse.Namespace, profile: str) -> dict[str, Any]:
    """The profile's sizes with the command line's overrides."""
    sizes = dict(PROFILES[profile])
    for key in (
        "backbones",
        "modes",
        "batch",
        "steps",
        "warmup",
        "classes",
        "pfc_classes",
        "rec_images",
        "train_steps",
        "extract_images",
    ):
        value = getattr(args, key)
        if value is not None:
            sizes[key] = value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sizes.update(
        profile=profile,
        input_size=args.input_size,
        pfc_sample_rate=args.pfc_sample_rate,
        workers=args.workers or cores,
        cores=cores,
        budget_s=args.budget_s,
        parts=list(args.parts),
    )
    return sizes


# --------------------------------------------------------------------------------------- the runner


class Check:
    """Runs the parts, each guarded, inside the time budget; collects every figure with its settings."""

    def __init__(self, sizes: dict[str, Any], device: torch.device, out: Path) -> None:
        self.sizes, self.device, self.out = sizes, device, out
        self.work = out / "work"
        self.start = time.perf_counter()
        self.parts: dict[str, dict[str, Any]] = {}
        self.synthetic: dict[tuple[str, str], float] = {}  # (backbone, mode) -> images/s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.sizes["budget_s"] - self.elapsed()

    def guarded(self, what: Callable[[], dict[str, Any]], needs_s: float = 0.0) -> dict[str, Any]:
        """``what()``'s record with ``status`` ok, or ``skipped``/``failed`` and the reason."""
        if self.left() < needs_s:
            return {
                "status": "skipped",
                "reason": f"time budget: {self.left():.0f} s left of "
                f"{self.sizes['budget_s']:.0f}, about {needs_s:.0f} s needed (--budget-s)",
            }
        began = time.perf_counter()
        try:
            record = {"status": "ok", **what()}
        except Skipped as why:
            record = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # one part failing is reported, the others still run
            where = traceback.extract_tb(err.__traceback__)[-1]
            record = {
                "status": "failed",
                "reason": f"{type(err).__name__}: {err} ({Path(where.filename).name}:{where.lineno})",
            }
        finally:
            self.release()
        record["seconds"] = round(time.perf_counter() - began, 2)
        return record

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"peak_rss_gib": round(rss, 3), "peak_memory_note": "CPU: the process's peak RSS so far"}

    def run(self) -> dict[str, Any]:
        order = [
            p
            for p in ("environment", "throughput", "partial_fc", "pipeline", "extraction", "train")
            if p in self.sizes["parts"]
        ]
        # compiled throughput rows go last: they cost the most time and the budget drops them first
        for part in order:
            self.parts[part] = getattr(self, f"part_{part}")()
        if "throughput" in self.parts and self.parts["throughput"].get("status") == "ok":
            self.parts["throughput"]["rows"] += self.throughput_rows(compiled=True)
        return self.parts

    # -- environment ------------------------------------------------------------------------------

    def part_environment(self) -> dict[str, Any]:
        def environment() -> dict[str, Any]:
            figures: dict[str, Any] = {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "nccl": None,
                "cpu_cores": self.sizes["cores"],
                "host": platform.node(),
            }
            with contextlib.suppress(Exception):
                figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            figures["collective"] = one_rank_all_reduce(self.device, self.out)
            if self.device.type == "cuda":
                props = torch.cuda.get_device_properties(self.device)
                figures.update(
                    device=props.name,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}",
                    device_count=torch.cuda.device_count(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                )
                peak = peak_tflops(props.name)
                figures["peak_tflops"] = peak[0] if peak else None
                figures["peak_source"] = peak[1] if peak else f"{props.name!r} is not in PEAK_TFLOPS: no MFU"
            else:
                figures.update(
                    device=f"CPU ({platform.processor() or platform.machine()})",
                    memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    peak_tflops=None,
                    peak_source="CPU: no dense bf16 peak, no MFU",
                )
            return {"figures": figures, "settings": {"threads": torch.get_num_threads()}}

        return self.guarded(environment)

    # -- throughput -------------------------------------------------------------------------------

    def part_throughput(self) -> dict[str, Any]:
        return self.guarded(lambda: {"rows": self.throughput_rows(compiled=False)})

    def throughput_rows(self, compiled: bool) -> list[dict[str, Any]]:
        rows = []
        for backbone in self.sizes["backbones"]:
            for mode in self.sizes["modes"]:
                if mode.endswith("compile") != compiled:
                    continue
                settings = self.step_settings(backbone, mode)
                if compiled and self.device.type != "cuda":
                    row = {"status": "skipped", "reason": CPU_NO_COMPILE}
                elif mode == "fp16" and self.device.type != "cuda":
                    row = {"status": "skipped", "reason": CPU_NO_FP16}
                else:
                    needs = 150.0 if compiled else 10.0
                    row = self.guarded(lambda b=backbone, m=mode: self.measure_training(b, m), needs)
                rows.append({"backbone": backbone, "mode": mode, "settings": settings, **row})
                if compiled:
                    torch._dynamo.reset()
        return rows

    def step_settings(self, backbone: str, mode: str) -> dict[str, Any]:
        return {
            "backbone": backbone,
            "mode": MODE_NAMES[mode],
            "batch": self.sizes["batch"],
            "input_size": self.sizes["input_size"],
            "precision": mode[:4],
            "channels_last": "_cl" in mode,
            "compile": mode.endswith("compile"),
            "head": "arcface (Partial FC, sample rate 1)",
            "classes": self.sizes["classes"],
            "embedding_size": 512,
            "optimizer": "SGD momentum 0.9",
            "steps": self.sizes["steps"],
            "warmup": self.sizes["warmup"],
        }

    def training_step(
        self, backbone_name: str, mode: str, classes: int
    ) -> tuple[Callable, Any, torch.nn.Module]:
        """train.py's step for ``mode`` on a fixed uint8 batch: (step(images, labels), batch, backbone)."""
        from backbones import build_backbone
        from data.transforms import normalize_batch
        from heads.partial_fc import PartialFC

        precision, channels_last = mode[:4], "_cl" in mode
        torch.manual_seed(0)
        backbone = build_backbone(
            backbone_name, embedding_size=512, precision=precision, input_size=self.sizes["input_size"]
        ).to(self.device)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        with torch.device(self.device):
            classifier = PartialFC("arcface", 512, classes)
        model = torch.compile(backbone) if mode.endswith("compile") else backbone
        params = [*backbone.parameters(), *classifier.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        size = self.sizes["input_size"]

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            x = normalize_batch(images.to(self.device, non_blocking=True), size=size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = classifier(model(x), labels.to(self.device, non_blocking=True))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

        g = torch.Generator().manual_seed(0)
        batch = (
            torch.randint(0, 256, (self.sizes["batch"], 3, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (self.sizes["batch"],), generator=g),
        )
        return step, tuple(t.to(self.device) for t in batch), backbone

    def measure_training(self, backbone_name: str, mode: str) -> dict[str, Any]:
        step, (images, labels), backbone = self.training_step(backbone_name, mode, self.sizes["classes"])
        gflops = forward_gflops(backbone, self.device, self.sizes["input_size"])
        began = time.perf_counter()
        for _ in range(self.sizes["warmup"]):
            step(images, labels)
        self.sync()
        warmup_s = time.perf_counter() - began
        self.reset_peak()
        began = time.perf_counter()
        for _ in range(self.sizes["steps"]):
            step(images, labels)
        self.sync()
        seconds = time.perf_counter() - began
        rate = self.sizes["steps"] * self.sizes["batch"] / seconds
        self.synthetic[(backbone_name, mode)] = rate
        figures = {
            "images_per_s": round(rate, 1),
            "ms_per_step": round(seconds / self.sizes["steps"] * 1e3, 2),
            "forward_gflops_per_image": round(gflops, 3),
            "warmup_s": round(warmup_s, 2),
            **self.achieved(gflops, rate),
            **self.peak_memory(),
        }
        return {"figures": figures}

    def achieved(self, gflops: float, rate: float) -> dict[str, Any]:
        tflops = 3 * gflops * rate / 1e3
        peak = peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        if peak is None:
            why = "CPU: no dense bf16 peak" if self.device.type != "cuda" else "device not in PEAK_TFLOPS"
            return {"training_tflops": round(tflops, 4), "mfu_percent": None, "mfu_note": why}
        return {
            "training_tflops": round(tflops, 2),
            "mfu_percent": round(100 * tflops / peak[0], 1),
            "peak_tflops": peak[0],
        }

    # -- Partial FC at WebFace42M size ---------------------------------------------------------------

    def part_partial_fc(self) -> dict[str, Any]:
        classes, rate, batch = self.sizes["pfc_classes"], self.sizes["pfc_sample_rate"], self.sizes["batch"]
        settings = {
            "classes": classes,
            "sample_rate": rate,
            "embedding_size": 512,
            "batch": batch,
            "head": "arcface",
            "optimizer": "SGD momentum 0.9 (full-size momentum and gradient)",
            "steps": self.sizes["pfc_steps"],
            "processes": 1,
        }

        def measure() -> dict[str, Any]:
            from heads.partial_fc import PartialFC

            self.reset_peak()
            with torch.device(self.device):  # the centres are drawn where they live
                pfc = PartialFC("arcface", 512, classes, sample_rate=rate)
            optimizer = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            embeddings = torch.randn(batch, 512, generator=g).to(self.device).requires_grad_()
            labels = torch.randint(0, classes, (batch,), generator=g).to(self.device)

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                pfc(embeddings, labels).backward()
                optimizer.step()

            step()
            self.sync()
            began = time.perf_counter()
            for _ in range(self.sizes["pfc_steps"]):
                step()
            self.sync()
            seconds = (time.perf_counter() - began) / self.sizes["pfc_steps"]
            weight_gib = classes * 512 * 4 / 2**30
            figures = {
                "step_ms": round(seconds * 1e3, 2),
                "weight_gib": round(weight_gib, 3),
                "classes_scored": int(rate * classes),
                **self.peak_memory(),
            }
            return {"figures": figures}

        return {"settings": settings, **self.guarded(measure, needs_s=10.0)}

    # -- the real input pipeline ----------------------------------------------------------------------

    def part_pipeline(self) -> dict[str, Any]:
        n, workers = self.sizes["rec_images"], self.sizes["workers"]
        reference = self.reference_mode()
        settings = {
            "images": n,
            "image_size": 112,
            "jpeg_quality": 95,
            "workers": workers,
            "batch": self.sizes["batch"],
            "augment": "base.yaml (flip 0.5)",
            "pin_memory": self.device.type == "cuda",
            "training": f"{reference[0]} {MODE_NAMES[reference[1]]}",
        }

        def measure() -> dict[str, Any]:
            rec = generated_recordio(self.work / "pipeline", n, per_identity=20, workers=workers)
            loader = training_loader(rec, self.sizes["batch"], workers, self.device.type == "cuda")
            figures = self.loader_rate(loader, train=None)
            step, _, _ = self.training_step(reference[0], reference[1], math.ceil(n / 20))
            loader = training_loader(rec, self.sizes["batch"], workers, self.device.type == "cuda")
            trained = self.loader_rate(loader, train=step)
            figures["training_images_per_s"] = trained["images_per_s"]
            synthetic = self.synthetic.get(reference)
            if synthetic:
                figures["synthetic_images_per_s"] = round(synthetic, 1)
                figures["real_over_synthetic"] = round(trained["images_per_s"] / synthetic, 3)
            figures.update(self.gpu_decode(rec))
            return {"figures": figures}

        return {"settings": settings, **self.guarded(measure, needs_s=20.0)}

    def reference_mode(self) -> tuple[str, str]:
        """The configuration the pipeline feeds: r50 bf16 + channels_last on a GPU, else the first row."""
        if self.device.type == "cuda":
            return ("r50" if "r50" in self.sizes["backbones"] else self.sizes["backbones"][0], "bf16_cl")
        return (self.sizes["backbones"][0], "bf16")

    def loader_rate(self, loader: Any, train: Callable | None) -> dict[str, Any]:
        """Images/s through ``loader`` (the batches copied to the device; with ``train``, trained on),
        counted after the first batch, whose wait (worker start-up) is reported apart."""
        began = time.perf_counter()
        batches = iter(loader)
        first = next(batches)
        startup = time.perf_counter() - began
        limit, most = self.sizes["loader_seconds"], self.sizes["loader_batches"][train is not None]
        count, began = 0, time.perf_counter()
        for done, (images, labels, _) in enumerate(batches, start=1):
            if train is not None:
                train(images, labels)
            else:
                images.to(self.device, non_blocking=True)
            count += len(images)
            if time.perf_counter() - began > limit or done == most:
                break
        self.sync()
        seconds = time.perf_counter() - began
        del first
        return {
            "images_per_s": round(count / seconds, 1) if count else None,
            "first_batch_s": round(startup, 2),
            "images_timed": count,
        }

    def gpu_decode(self, rec: Path) -> dict[str, Any]:
        """JPEG decoding images/s: cv2 on one CPU core, and torchvision's nvJPEG on the device."""
        import cv2

        from data.recordio import RecordIOFaceSet

        faces = RecordIOFaceSet(rec)
        jpegs = [faces[i][0] for i in range(min(len(faces), 2048))]
        began = time.perf_counter()
        for buf in jpegs:
            cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
        figures: dict[str, Any] = {
            "cpu_decode_images_per_s_per_core": round(len(jpegs) / (time.perf_counter() - began), 1)
        }
        if self.device.type != "cuda":
            figures["gpu_decode_note"] = "no CUDA device"
            return figures
        try:
            from torchvision.io import decode_jpeg
        except ImportError:
            figures["gpu_decode_note"] = "torchvision is not installed: GPU decoding not measured"
            return figures
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
        decode_jpeg(data[:64], device=self.device)
        self.sync()
        began = time.perf_counter()
        for i in range(0, len(data), 256):
            decode_jpeg(data[i : i + 256], device=self.device)
        self.sync()
        figures["gpu_decode_images_per_s"] = round(len(data) / (time.perf_counter() - began), 1)
        return figures

    # -- torchrun train.py ------------------------------------------------------------------------

    def part_train(self) -> dict[str, Any]:
        steps, extra = self.sizes["train_steps"], self.sizes["resume_steps"]
        cuda = self.device.type == "cuda"
        identities = 200 if cuda else 8
        nproc = min(2, torch.cuda.device_count()) if cuda else 1
        out = self.work / "train_run"
        overrides = [
            f"data.root={self.work / 'identities' / 'train.rec'}",
            f"output_dir={out}",
            f"model.backbone={self.sizes['train_backbone']}",
            f"data.batch_size={self.sizes['train_batch']}",
            "data.val_root=",
            f"data.num_workers={min(self.sizes['workers'], 8)}",
            "train.epochs=1000",
            f"train.log_every={10 if cuda else 1}",
            f"train.save_every={max(1, steps // 2)}",
        ]
        if cuda:
            overrides += ["model.precision=bf16", "model.channels_last=true"]
        else:  # the demo's settings: faces resized to 64 on the device, no warm-up
            overrides += ["model.input_size=64", "schedule.warmup_epochs=0"]
        settings = {
            "command": f"torchrun --standalone --nproc_per_node={nproc} train.py",
            "processes": nproc,
            "backend": "nccl" if nproc > 1 else "none: one process joins no process group",
            "config": "configs/base.yaml" if cuda else "configs/cpu_tiny.yaml",
            "overrides": overrides,
            "backbone": self.sizes["train_backbone"],
            "batch": self.sizes["train_batch"],
            "steps": steps,
            "resumed_to": steps + extra,
            "data": f"{identities} generated identities, 20 images each",
        }

        def run() -> dict[str, Any]:
            generated_recordio(
                self.work / "identities",
                identities * 20,
                per_identity=20,
                workers=self.sizes["workers"],
                learnable=True,
            )
            shutil.rmtree(out, ignore_errors=True)
            first = self.torchrun(
                nproc, settings["config"], [*overrides, f"train.max_steps={steps}"], out, ""
            )
            losses = logged_losses(out / "train.log")
            checkpoint = out / "last.pt"
            if not checkpoint.is_file():
                raise RuntimeError(f"no checkpoint {checkpoint} after the first run")
            saved_step = checkpoint_step(checkpoint)
            second = self.torchrun(
                nproc, settings["config"], [*overrides, f"train.max_steps={steps + extra}"], out, "auto"
            )
            log = (out / "train.log").read_text()
            resumed = re.search(r"resumed \S+ at epoch \d+ step (\d+)", log)
            final_step = checkpoint_step(checkpoint)
            head, tail = np.mean(losses[:3]), np.mean(losses[-3:])
            figures = {
                "first_losses": [round(v, 3) for v in losses[:3]],
                "last_losses": [round(v, 3) for v in losses[-3:]],
                "loss_falls": bool(tail < head),
                "checkpoint_step": saved_step,
                "resumed_at_step": int(resumed.group(1)) if resumed else None,
                "final_step": final_step,
                "first_run_s": round(first, 1),
                "resume_run_s": round(second, 1),
            }
            problems = []
            if not figures["loss_falls"]:
                problems.append(f"the loss did not fall ({head:.3f} -> {tail:.3f})")
            if figures["resumed_at_step"] != saved_step or final_step != steps + extra:
                problems.append(
                    f"resume: from step {figures['resumed_at_step']} (saved {saved_step}), "
                    f"ended at {final_step} (expected {steps + extra})"
                )
            if problems:
                return {"status": "failed", "reason": "; ".join(problems), "figures": figures}
            return {"figures": figures}

        return {"settings": settings, **self.guarded(run, needs_s=30.0)}

    def torchrun(self, nproc: int, config: str, overrides: list[str], out: Path, resume: str) -> float:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "train.py",
            "--config",
            config,
            "--set",
            *overrides,
            *(["--resume", resume] if resume else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, self.sizes["cores"] // 2))}
        if self.device.type != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU version trains on the CPU, with gloo
        began = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(60.0, self.left() + 60),
            check=False,
        )
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"train.py exited with status {done.returncode}: {' | '.join(tail)}")
        return time.perf_counter() - began

    # -- extraction and the IJB-C projection ----------------------------------------------------------

    def part_extraction(self) -> dict[str, Any]:
        name, n, batch = (
            self.sizes["extract_backbone"],
            self.sizes["extract_images"],
            self.sizes["extract_batch"],
        )
        cuda = self.device.type == "cuda"
        precision = "bf16" if cuda else "fp32"
        settings = {
            "backbone": name,
            "precision": precision,
            "channels_last": cuda,
            "images": n,
            "batch": batch,
            "flip": True,
            "embedder": "evaluation.embedders.TorchEmbedder + evaluation.extract.extract",
            "ijbc_images": IJBC_IMAGES,
            "align_images": self.sizes["align_images"],
        }

        def measure() -> dict[str, Any]:
            from backbones import build_backbone
            from evaluation.embedders import TorchEmbedder
            from evaluation.extract import extract

            torch.manual_seed(0)
            backbone = build_backbone(name, embedding_size=512, input_size=self.sizes["input_size"])
            if cuda:
                backbone = backbone.to(self.device, memory_format=torch.channels_last)
            embedder = TorchEmbedder(backbone, "rgb", self.device, channels_last=cuda, precision=precision)
            size = self.sizes["input_size"]
            images = np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
            extract(embedder, images[:batch], batch_size=batch)  # warm-up (cuDNN plans, allocator)
            self.sync()
            began = time.perf_counter()
            features, flipped = extract(embedder, images, batch_size=batch, flip=True)
            seconds = time.perf_counter() - began
            rate = n / seconds
            align = decode_and_align_rate(self.sizes["align_images"])
            cores = self.sizes["cores"]
            figures = {
                "images_per_s_with_flip": round(rate, 1),
                "forward_passes_per_s": round(2 * rate, 1),
                "ijbc_extraction_s": round(IJBC_IMAGES / rate, 1),
                "decode_align_images_per_s_per_core": round(align, 1),
                "ijbc_decode_align_s_all_cores": round(IJBC_IMAGES / (align * cores), 1),
                "ijbc_projected_s": round(IJBC_IMAGES / rate + IJBC_IMAGES / (align * cores), 1),
                "projection_note": f"extraction + decode and alignment on {cores} cores, not overlapped",
                "finite": bool(np.isfinite(features).all() and np.isfinite(flipped).all()),
            }
            return {"figures": figures}

        return {"settings": settings, **self.guarded(measure, needs_s=10.0)}


# --------------------------------------------------------------------------------------------- parts


def one_rank_all_reduce(device: torch.device, folder: Path) -> str:
    """A process group of one rank (NCCL on a GPU, gloo on a CPU) and one all-reduce: the library loads
    and talks to the device. The answer in words."""
    import torch.distributed as dist

    if dist.is_initialized():
        return "a process group is already initialised: not checked"
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = folder / "one_rank_store"
    store.unlink(missing_ok=True)
    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        value = torch.ones(4, device=device)
        dist.all_reduce(value)
        dist.barrier()
        return f"{backend} all_reduce on 1 rank: ok" if bool((value == 1).all()) else f"{backend}: wrong sum"
    except Exception as err:  # reported in the environment's figures
        return f"{backend} all_reduce on 1 rank failed: {type(err).__name__}: {err}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        store.unlink(missing_ok=True)


def peak_tflops(name: str) -> tuple[float, str] | None:
    """(dense bf16 peak TFLOP/s, which entry) of the device called ``name``, or None when unknown."""
    for pattern, peak, source in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peak, source
    return None


def forward_gflops(backbone: torch.nn.Module, device: torch.device, size: int) -> float:
    """GFLOPs of one image's forward pass (torch.utils.flop_counter; a multiply-add counts 2; the CPU
    attention kernel counted as the CUDA ones are, :data:`scripts.bench_backbones.ATTENTION_OPS`)."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.bench_backbones import ATTENTION_OPS

    was_training = backbone.training
    backbone.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_OPS) as counter:
        backbone(torch.zeros(1, 3, size, size, device=device))
    backbone.train(was_training)
    return counter.get_total_flops() / 1e9


def identity_images(identity: int, count: int, learnable: bool) -> list[bytes]:
    """``count`` 112x112 JPEGs of one generated identity: a smooth colour pattern, shifted, re-lit and
    noisy per image when ``learnable``, else smooth random noise per image."""
    import cv2

    from data.decode import encode_jpeg

    rng = np.random.default_rng([7, identity])
    pattern = cv2.resize(
        rng.uniform(70, 185, (4, 4, 3)).astype(np.float32), (112, 112), interpolation=cv2.INTER_CUBIC
    )
    out = []
    for _ in range(count):
        if learnable:
            dy, dx = rng.integers(-6, 7, size=2)
            img = np.roll(pattern, (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.7, 1.3)
            img = img + rng.uniform(-30, 30) + rng.normal(0, 15, img.shape)
        else:
            img = cv2.resize(rng.uniform(0, 255, (8, 8, 3)).astype(np.float32), (112, 112))
        out.append(encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=95))
    return out


def _identity_job(job: tuple[int, int, bool]) -> list[bytes]:
    return identity_images(*job)


def generated_recordio(
    folder: Path, images: int, per_identity: int, workers: int, learnable: bool = False
) -> Path:
    """An insightface-layout ``train.rec``/``.idx`` of ``images`` generated faces, ``per_identity`` each,
    written with the framework's RecordIO writer."""
    from concurrent.futures import ProcessPoolExecutor

    from scripts.bench_data import write_face_rec

    identities = max(2, math.ceil(images / per_identity))
    jobs = [(k, min(per_identity, images - k * per_identity), learnable) for k in range(identities)]
    jobs = [j for j in jobs if j[1] > 0]
    if images >= 2000 and workers > 1:
        from core.threads import fork_safe_opencv

        fork_safe_opencv()
        with ProcessPoolExecutor(min(workers, 16)) as pool:
            groups = list(pool.map(_identity_job, jobs, chunksize=8))
    else:
        groups = [_identity_job(j) for j in jobs]
    items = [(k, jpeg) for (k, _, _), group in zip(jobs, groups, strict=True) for jpeg in group]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return write_face_rec(folder / "train", items)


def training_loader(rec: Path, batch: int, workers: int, pin_memory: bool) -> Iterator:
    """The training loader of train.py's data path: config -> dataset -> keyed sampler -> DataLoader."""
    from core.config import load_config
    from data.builder import build_train_dataset
    from data.sampler import GlobalBatchSampler, KeyedFaceDataset

    cfg = load_config(
        PROJECT_ROOT / "configs" / "base.yaml", [f"data.root={rec}", f"data.batch_size={batch}"]
    )
    faces = build_train_dataset(cfg.data, seed=cfg.experiment.seed)
    dataset = KeyedFaceDataset(faces, seed=cfg.experiment.seed)
    sampler = GlobalBatchSampler(len(dataset), batch, seed=cfg.experiment.seed)
    return dataset.loader(sampler, workers, pin_memory=pin_memory)


def logged_losses(log: Path) -> list[float]:
    """The losses train.py logged (``step S/T loss X``), in order."""
    losses = [float(v) for v in re.findall(r"step \d+/\d+ loss ([-+0-9.eE]+|nan|inf)", log.read_text())]
    if not losses:
        raise RuntimeError(f"{log}: no logged losses")
    return losses


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def decode_and_align_rate(count: int) -> float:
    """Images/s on one core of decoding a 250x250 JPEG photo and aligning its face to 112x112 from five
    landmarks (the IJB-C path: loose crops, landmarks given)."""
    import cv2

    from data.decode import decode_rgb, encode_jpeg
    from face_alignment.align import ARCFACE_TEMPLATE, align_face

    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.uniform(0, 255, (16, 16, 3)).astype(np.uint8), (250, 250))
    jpeg = encode_jpeg(photo, quality=90)
    landmarks = ARCFACE_TEMPLATE * 1.4 + 30.0
    began = time.perf_counter()
    with _threads(1):
        for _ in range(count):
            align_face(decode_rgb(jpeg), landmarks)
    return count / (time.perf_counter() - began)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


# ---------------------------------------------------------------------------------------------- table


SETTING_LINES = {
    "partial_fc": "{classes:,} classes, sample rate {sample_rate}, batch {batch}",
    "pipeline": "{images:,} JPEGs, {workers} workers, {training}",
    "extraction": "{backbone} {precision}, {images} images + flips",
    "train": "{backbone}, {processes} process(es), {steps} steps + resume",
}


def table(report: dict[str, Any]) -> str:
    """One table: part | configuration | figures (or status and reason)."""
    rows: list[tuple[str, str, str]] = []
    parts = report["parts"]

    def result(record: dict[str, Any], keys: list[str]) -> str:
        if record.get("status") != "ok":
            text = f"{record.get('status', '?').upper()}: {record.get('reason', '')}"
            if record.get("figures"):
                text += " | " + ", ".join(
                    f"{k} {record['figures'][k]}" for k in keys if k in record["figures"]
                )
            return text
        figures = record.get("figures", {})
        return ", ".join(f"{k} {figures[k]}" for k in keys if figures.get(k) is not None)

    env = parts.get("environment")
    if env:
        rows.append(
            (
                "environment",
                "",
                result(
                    env,
                    [
                        "device",
                        "memory_gib",
                        "torch",
                        "cuda",
                        "cudnn",
                        "nccl",
                        "cpu_cores",
                        "peak_tflops",
                        "collective",
                    ],
                ),
            )
        )
    throughput = parts.get("throughput")
    if throughput:
        if throughput.get("status") != "ok":
            rows.append(("throughput", "", result(throughput, [])))
        for row in throughput.get("rows", []):
            s = row["settings"]
            rows.append(
                (
                    "throughput",
                    f"{row['backbone']} {s['mode']}, batch {s['batch']}, {s['input_size']}px",
                    result(
                        row,
                        [
                            "images_per_s",
                            "training_tflops",
                            "mfu_percent",
                            "peak_memory_gib",
                            "peak_rss_gib",
                            "warmup_s",
                        ],
                    ),
                )
            )
    for name, keys in (
        ("partial_fc", ["step_ms", "peak_memory_gib", "peak_rss_gib", "weight_gib", "classes_scored"]),
        (
            "pipeline",
            [
                "images_per_s",
                "training_images_per_s",
                "synthetic_images_per_s",
                "real_over_synthetic",
                "first_batch_s",
                "cpu_decode_images_per_s_per_core",
                "gpu_decode_images_per_s",
                "gpu_decode_note",
            ],
        ),
        (
            "extraction",
            [
                "images_per_s_with_flip",
                "ijbc_extraction_s",
                "decode_align_images_per_s_per_core",
                "ijbc_projected_s",
            ],
        ),
        (
            "train",
            [
                "loss_falls",
                "first_losses",
                "last_losses",
                "checkpoint_step",
                "resumed_at_step",
                "final_step",
                "first_run_s",
                "resume_run_s",
            ],
        ),
    ):
        record = parts.get(name)
        if record:
            setting = SETTING_LINES[name].format_map(record.get("settings", {}))
            rows.append((name, setting, result(record, keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(2)] if rows else [0, 0]
    lines = [report["first_line"], ""]
    lines += [f"{a:<{widths[0]}} | {b:<{widths[1]}} | {c}" for a, b, c in rows]
    lines.append(f"\n{report['seconds']:.0f} s in all; every figure with its settings: {report['json']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    profile = "gpu" if cuda else "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = settings_from(args, profile)
    if cuda:
        first = f"GPU check on {torch.cuda.get_device_name(device)}: the GPU verdict"
    else:
        why = "--cpu given" if args.cpu else "no CUDA device"
        first = (
            f"GPU check, CPU version ({why}): mbf only, tiny sizes, gloo, bf16 without compilation; "
            "these figures say nothing about a GPU"
        )
    print(first, flush=True)
    check = Check(sizes, device, out)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    try:
        parts = check.run()
    finally:
        if not args.keep:
            shutil.rmtree(check.work, ignore_errors=True)
    path = out / "gpu_check.json"
    report = {
        "version": 1,
        "profile": profile,
        "first_line": first,
        "started": started,
        "seconds": round(check.elapsed(), 1),
        "settings": sizes,
        "parts": parts,
        "json": str(path),
    }
    write_json(path, report, indent=1)
    print(table(report).split("\n", 1)[1], flush=True)
    failed = [name for name, record in parts.items() if record.get("status") == "failed"]
    failed += [
        f"throughput {r['backbone']} {r['mode']}"
        for r in parts.get("throughput", {}).get("rows", [])
        if r.get("status") == "failed"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
