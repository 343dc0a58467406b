"""The main job on real faces: train a small model on CPU and evaluate it on people it has never seen.

1. packs the CelebA identities of the data folder (aligned 112x112 crops) into a RecordIO (reused later);
2. builds the 6,000 official LFW pairs from the raw LFW photos with this framework's own pipeline
   (YuNet detection, alignment to the ArcFace template, ``scripts/prepare_dataset.py``; reused later):
   no LFW person is in CelebA;
3. trains ``configs/demo_cpu.yaml`` through ``train.py`` (``--resume auto``: a second run continues or, when
   finished, only re-evaluates), validating on LFW with the 10-fold protocol;
4. prints the LFW result and plots the learning curves (training loss, LFW accuracy at each validation);
5. runs ``inference.py`` with the new checkpoint on the sample photos, and says where the checkpoint, logs,
   TensorBoard files and plots are.

    python -m scripts.demo --data ../shared/data --out work_dirs/demo [--set train.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.checkpoint import load_checkpoint
from core.config import ConfigError, load_config, parse_overrides
from core.fileio import atomic_write
from core.logbook import read_scalars
from core.paths import PROJECT_ROOT, shared_data_dir
from data.recordio import RecordIOFaceSet, pack_folder
from scripts import prepare_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=shared_data_dir(), help="real face data folder")
    parser.add_argument(
        "--celeba", type=Path, help="aligned CelebA crops <id>/<img> (default: DATA/celeba_aligned112)"
    )
    parser.add_argument(
        "--lfw",
        type=Path,
        help="the LFW photos, flat <Name>_<NNNN>.jpg or <Name>/<Name>_<NNNN>.jpg "
        "(default: DATA/lfw_color150)",
    )
    parser.add_argument("--lfw-pairs", type=Path, help="LFW's pairs.txt (default: DATA/lfw_pairs.txt)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work_dirs" / "demo")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "demo_cpu.yaml")
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="more train.py overrides")
    return parser.parse_args(argv)


def prepare_training_rec(celeba: Path, out: Path) -> Path:
    """Pack ``celeba/<identity>/<img>`` to ``out/train.rec`` unless a complete pack is already there."""
    prefix = out / "train"
    rec = prefix.with_suffix(".rec")
    if rec.is_file() and prefix.with_suffix(".idx").is_file():
        print(f"[1/5] reusing {rec}")
    else:
        print(f"[1/5] packing {celeba} -> {rec}")
        pack_folder(celeba, prefix)
    faces = RecordIOFaceSet(rec)
    print(f"      {faces.num_images} images of {faces.num_identities} identities")
    return rec


def prepare_validation(photos: Path, pairs: Path, out: Path) -> Path:
    """``out/lfw.bin`` (the name train.py's ``data.val_targets`` looks for) from the raw LFW photos: a flat
    folder of ``<Name>_<NNNN>.jpg`` or LFW's own ``<Name>/<Name>_<NNNN>.jpg`` tree."""
    target = out / "lfw.bin"
    if target.is_file():
        print(f"[2/5] reusing {target}")
        return out
    print(f"[2/5] detecting and aligning {photos} -> {target}")
    flat = ["--flat"] if any(photos.glob("*.jpg")) else []
    args = [str(photos), str(out), *flat, "--pairs", str(pairs), "--bin", "lfw.bin"]
    if prepare_dataset.main(args) != 0:
        raise SystemExit(f"demo: could not build {target} from {photos}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    celeba = args.celeba or args.data / "celeba_aligned112"
    lfw_photos = args.lfw or args.data / "lfw_color150"
    lfw_pairs = args.lfw_pairs or args.data / "lfw_pairs.txt"
    for needed in (celeba, lfw_photos, lfw_pairs):
        if not needed.exists():
            print(
                f"demo: {needed} not found. Point DATA= (make demo DATA=/path) or --data at a folder "
                "laid out like ../shared/data: celeba_aligned112/<identity>/<img>.jpg (CelebA, aligned "
                "112x112), lfw_color150/<Name>_<NNNN>.jpg (the LFW photos) and lfw_pairs.txt (LFW's "
                "pairs.txt), or name each: CELEBA=, LFW=, PAIRS= (--celeba, --lfw, --lfw-pairs).",
                file=sys.stderr,
            )
            return 1
    rec = prepare_training_rec(celeba, args.out / "celeba")
    val_root = prepare_validation(lfw_photos, lfw_pairs, args.out / "lfw")

    import train  # the entry point itself, so the demo runs exactly what users launch

    # OUT/<the last part of the config's output_dir>: run for the demo, distill for configs/distill_cpu.yaml;
    # an output_dir among the --set overrides is the run's folder, read as train.py reads it
    try:
        run_dir = args.out / Path(load_config(args.config).output_dir).name
        chosen = parse_overrides(args.set).get("output_dir")
    except (ConfigError, OSError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    run_dir = Path(str(chosen)) if chosen else run_dir
    sets = [f"data.root={rec}", f"data.val_root={val_root}", f"output_dir={run_dir}", *args.set]
    print(f"[3/5] python train.py --config {args.config} --set {' '.join(sets)} --resume auto")
    status = train.main(["--config", str(args.config), "--set", *sets, "--resume", "auto"])
    if status != 0:
        return status
    state = load_checkpoint(run_dir / "last.pt")
    lfw = state["validation"]["lfw"]
    print("[4/5] LFW, 6,000 pairs of people not in the training data (10-fold, flip-sum fusion):")
    print(f"      accuracy {lfw['accuracy'] * 100:.2f}% ± {lfw['accuracy_std'] * 100:.2f}, "
          f"VAL@FAR=1e-3 {lfw['val_at_far_1e-3'] * 100:.2f}% after {state['step']} steps")  # fmt: skip
    average = (state.get("ema") or {}).get("validation", {}).get("lfw")
    if average:  # train.ema: the weight average was validated too
        accuracy, std, val = (average[k] * 100 for k in ("accuracy", "accuracy_std", "val_at_far_1e-3"))
        print(f"      weight average (train.ema): accuracy {accuracy:.2f}% ± {std:.2f}, "
              f"VAL@FAR=1e-3 {val:.2f}%")  # fmt: skip
    label = "demo" if run_dir.name == "run" else run_dir.name
    curves = plot_learning_curves({label: read_scalars(run_dir, CURVES)}, run_dir / "curves.png")
    import inference

    print(f"[5/5] python inference.py --model {run_dir / 'last.pt'}   (the sample photos)")
    inference.main(["--model", str(run_dir / "last.pt")])
    print(f"      checkpoint {run_dir / 'last.pt'} (best: {run_dir / 'best.pt'})")
    print(f"      config {run_dir / 'config.yaml'}")
    print(f"      log {run_dir / 'train.log'}, TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"      learning curves (loss, LFW accuracy) {curves}")
    return 0


# The TensorBoard scalars the learning-curve plots read.
CURVES = {"loss": "train/loss", "lfw": "val/lfw_accuracy"}


def plot_learning_curves(runs: dict[str, dict[str, list[float]]], path: Path, bars=None) -> Path:
    """Training loss and LFW accuracy against the step for each run (``core.logbook.read_scalars`` of
    :data:`CURVES`) to a PNG; ``bars`` (callable on a matplotlib axis) draws an extra panel first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if bars else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    if bars:
        bars(axes[0])
    losses, accuracy = axes[-2:]
    for name, curve in runs.items():
        if "loss" in curve:
            losses.plot(curve["loss_step"], curve["loss"], label=name)
        if "lfw" in curve:
            accuracy.plot(curve["lfw_step"], [a * 100 for a in curve["lfw"]], marker="o", label=name)
    losses.set(xlabel="step", ylabel="training loss", title="training loss")
    accuracy.set(xlabel="step", ylabel="LFW accuracy (%)", title="LFW (unseen people) during training")
    for ax in (losses, accuracy):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
