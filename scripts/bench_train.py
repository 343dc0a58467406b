"""Training throughput of a backbone + head: images/s, peak memory and model FLOPs utilisation.

    python -m scripts.bench_train --backbone r50 --batch 128 --precision bf16 --channels-last --compile
    python -m scripts.bench_train --backbone mbf --batch 64 --rec /data/faces_emore   # with data loading

Synthetic mode keeps one uint8 batch on the device and times the optimizer steps of train.py's loop
(forward, Partial FC loss, backward, SGD step). With ``--rec`` the run is train.py's own ``train_step`` on
batches from the RecordIO (decode, augment, transfer included). FLOPs are counted on the forward pass
(torch.utils.flop_counter) and a training step is taken as 3x forward (backward = 2x); MFU divides the
achieved FLOP/s by ``--peak-tflops`` (default: the dense bf16/fp16 peak of a known GPU, or none on CPU).
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from core.config import load_config
from core.optim import build_optimizer
from core.paths import PROJECT_ROOT
from data.transforms import normalize_batch
from losses import LOSSES
from objectives.classification import build_classifier

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L40S": 362.0, "A10": 125.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="r50")
    p.add_argument("--head", default="arcface")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--classes", type=int, default=10_000, help="classifier size (synthetic mode)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--input-size", type=int, default=0, help="network input side (model.input_size)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--rec", default="", help="a RecordIO (prefix, .rec or folder) to read batches from")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known GPUs)")
    return p


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def config(args: argparse.Namespace, root: str):
    return load_config(
        PROJECT_ROOT / "configs" / "base.yaml",
        [
            f"model.backbone={args.backbone}", f"head.name={args.head}", f"data.batch_size={args.batch}",
            f"model.precision={args.precision}", f"model.channels_last={str(args.channels_last).lower()}",
            f"model.compile={str(args.compile).lower()}", f"data.root={root}",
            f"data.num_workers={args.workers}", "data.val_root=", "train.epochs=1000",
            *([f"model.input_size={args.input_size}"] if args.input_size else []),
        ],
    )  # fmt: skip


def forward_gflops(model: torch.nn.Module, device: torch.device, size: int) -> float:
    x = torch.zeros(1, 3, size, size, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train()
    return counter.get_total_flops() / 1e9


def synthetic_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], None], torch.nn.Module]:
    cfg = config(args, "")
    backbone = train.build_model(cfg).to(device)
    if cfg.model.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    classifier = build_classifier(cfg, args.classes).to(device)
    loss_fn = LOSSES.build(cfg.loss.name)
    model = torch.compile(backbone) if cfg.model.compile else backbone
    optimizer = build_optimizer(cfg.optim, [backbone, classifier])
    scaler = torch.amp.GradScaler(device.type) if cfg.model.precision == "fp16" else None
    images = torch.randint(0, 256, (args.batch, 3, 112, 112), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        x = normalize_batch(images, size=cfg.model.input_size)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ce, all_labels = classifier.per_sample_ce(model(x), labels)
        loss = loss_fn.reduce(ce, all_labels)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step, backbone


def recordio_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], None], torch.nn.Module]:
    run = train.build(config(args, args.rec), device)
    batches = iter(train.epoch_loader(run))

    def step() -> None:
        train.train_step(run, [next(batches)])
        run.state.step += 1

    return step, run.backbone


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, backbone = (recordio_step if args.rec else synthetic_step)(args, device)
    gflops = forward_gflops(backbone, device, backbone.input_size)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    images_per_s = args.steps * args.batch / elapsed
    achieved = 3 * gflops * images_per_s / 1e3  # TFLOP/s
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    mode = f"RecordIO {args.rec}" if args.rec else f"synthetic, {args.classes} classes"
    print(f"device: {name}; {mode}")
    print(
        f"{args.backbone} + {args.head}, input {backbone.input_size}x{backbone.input_size}, "
        f"batch {args.batch}, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}"
    )
    print(f"forward: {gflops:.2f} GFLOP/image")
    print(f"throughput: {images_per_s:.1f} images/s ({elapsed / args.steps * 1e3:.1f} ms/step)")
    print(
        f"achieved: {achieved:.2f} TFLOP/s"
        + (f", MFU {achieved / peak * 100:.1f}% of {peak:.0f}" if peak else "")
    )
    print(f"peak memory: {memory}")


if __name__ == "__main__":
    main()
