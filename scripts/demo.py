"""The main job, as far as this build goes: real faces in, the configured model and data checked.

1. packs the CelebA identities of the data folder into a RecordIO (reused when it already exists);
2. reads the LFW verification pairs (`lfw_yunet112.bin`);
3. runs ``train.py --dry-run`` on the packed data with ``configs/demo_cpu.yaml``.

    python -m scripts.demo --data ../shared/data --out work_dirs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.paths import PROJECT_ROOT, shared_data_dir
from data.recordio import RecordIOFaceSet, pack_folder
from data.verification import load_bin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=shared_data_dir(), help="real face data folder")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work_dirs" / "demo")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "demo_cpu.yaml")
    return parser.parse_args()


def prepare_training_rec(celeba: Path, out: Path) -> Path:
    """Pack ``celeba/<identity>/<img>`` to ``out/train.rec`` unless a complete pack is already there."""
    prefix = out / "train"
    rec = prefix.with_suffix(".rec")
    if rec.is_file() and prefix.with_suffix(".idx").is_file():
        print(f"[1/3] reusing {rec}")
    else:
        print(f"[1/3] packing {celeba} -> {rec}")
        pack_folder(celeba, prefix)
    faces = RecordIOFaceSet(rec)
    print(f"      {faces.num_images} images of {faces.num_identities} identities, header={faces.has_header}")
    return rec


def main() -> int:
    args = parse_args()
    celeba, lfw_bin = args.data / "celeba_aligned112", args.data / "lfw_yunet112.bin"
    for needed in (celeba, lfw_bin):
        if not needed.exists():
            print(
                f"demo: {needed} not found. Point DATA= (make demo DATA=/path) or --data at a folder "
                "laid out "
                "like ../shared/data: celeba_aligned112/<identity>/<img>.jpg (CelebA, aligned 112x112) and "
                "lfw_yunet112.bin (the 6,000 LFW pairs in insightface .bin layout).",
                file=sys.stderr,
            )
            return 1
    rec = prepare_training_rec(celeba, args.out / "celeba")

    lfw = load_bin(lfw_bin)
    print(
        f"[2/3] {lfw_bin}: {len(lfw.issame)} pairs ({int(lfw.issame.sum())} same), images {lfw.images.shape}"
    )

    import train  # the entry point itself, so the demo exercises exactly what users launch

    print(f"[3/3] python train.py --config {args.config} --dry-run")
    overrides = [f"data.root={rec.parent}", f"output_dir={args.out}"]
    status = train.main(["--config", str(args.config), "--set", *overrides, "--dry-run"])
    print(
        json.dumps({"training_rec": str(rec), "lfw_bin": str(lfw_bin), "config": str(args.config)}, indent=2)
    )
    print(
        "The training loop and the LFW evaluation join this demo once heads, losses and train.py's loop "
        "are in place; the data and model above are what they will use."
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
