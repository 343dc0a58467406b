"""Print the cosine-similarity matrix of faces in photos.

    python inference.py                                   # the sample photos in face_alignment/test_images
    python inference.py --images a.jpg b.jpg c.jpg [--model M] [--backbone r50] [--color bgr]
    python inference.py --aligned --images crop1.jpg crop2.jpg --model model.pt --backbone r50

Each photo goes through face detection (YuNet) and 5-point alignment to the 112x112 ArcFace template; a
photo with several faces contributes its largest (and says so); one that gives no face (unreadable, not an
image, no face found) is named on stderr with the reason and left out while the others are scored (exit
status 1 only when fewer than two photos remain). ``--aligned`` takes already aligned 112x112 crops as they
are. ``--model`` is a checkpoint of this framework (architecture and colour order inside), an insightface
``model.pt`` state dict (with ``--backbone``) or an ONNX model; the default is the pretrained MobileFaceNet
ONNX of the real data folder.
Cosines above about 0.3 usually mean the same person for ArcFace-family models.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.cli import error_line, main_guard
from core.paths import PROJECT_ROOT
from core.threads import use_threads
from data.decode import DecodeError, decode_rgb
from evaluation.embedders import load_embedder
from face_alignment import YuNetDetector, align_face, find_model, largest_face

SAMPLES = PROJECT_ROOT / "face_alignment" / "test_images"
DEFAULT_MODEL = "mobilefacenet_paddle_128d.onnx"  # BGR input, (x - 127.5) / 127.5
DEFAULT_MODEL_URL = "a MobileFaceNet ONNX export (see ../shared/data/README.md)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", nargs="+", type=Path, help="photos (default: the sample photos)")
    parser.add_argument("--model", type=Path, help="checkpoint, insightface model.pt or .onnx")
    parser.add_argument("--backbone", help="architecture of a plain state dict (r50, r100, mbf, ...)")
    parser.add_argument(
        "--color", choices=["rgb", "bgr"], help="colour order of the model (default: its own)"
    )
    parser.add_argument("--aligned", action="store_true", help="the images are aligned 112x112 crops")
    parser.add_argument("--detector", type=Path, help="YuNet ONNX file (default: found in $FACEREC_MODELS)")
    return parser.parse_args(argv)


def read_photo(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of ``path``; an unreadable or undecodable file is an error naming it."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DecodeError(f"{path}: cannot read ({err.strerror or err})") from None
    return decode_rgb(data, source=str(path))


def read_aligned(paths: Sequence[Path], size: int = 112) -> torch.Tensor:
    """uint8 RGB N x 3 x size x size from crops; a crop of another size is an error naming the file."""
    return torch.from_numpy(np.stack([aligned_crop(path, size) for path in paths]))


def aligned_crop(path: Path, size: int = 112) -> np.ndarray:
    """3 x size x size uint8 RGB pixels of an aligned crop, or an error naming the file."""
    img = read_photo(path)
    if img.shape[:2] != (size, size):
        raise ValueError(
            f"{path}: {img.shape[1]}x{img.shape[0]} image; expected an aligned {size}x{size} face crop"
        )
    return img.transpose(2, 0, 1)


def detected_crop(path: Path, detector: YuNetDetector) -> np.ndarray:
    """3 x 112 x 112 aligned crop of the largest face in a photo, or an error naming the photo."""
    image = read_photo(path)
    faces = detector.detect(image)
    face = largest_face(faces)
    if face is None:
        raise ValueError(f"{path}: no face found")
    if len(faces) > 1:
        print(f"{path}: {len(faces)} faces; using the largest ({face.box.round().astype(int).tolist()})")
    return align_face(image, face.landmarks).transpose(2, 0, 1)


def gather_faces(
    paths: Sequence[Path], crop: Callable[[Path], np.ndarray]
) -> tuple[list[Path], torch.Tensor]:
    """The crops of the photos that give one; each photo that does not (unreadable, not an image, no face,
    a crop of the wrong size) is named on stderr with the reason and left out."""
    kept, crops = [], []
    for path in paths:
        try:
            crops.append(crop(path))
        except ValueError as err:  # DecodeError included
            print(f"{err}; left out", file=sys.stderr)
            continue
        kept.append(path)
    images = torch.from_numpy(np.stack(crops)) if crops else torch.empty(0, 3, 112, 112, dtype=torch.uint8)
    return kept, images


def detect_and_align(paths: Sequence[Path], detector: YuNetDetector) -> tuple[list[Path], torch.Tensor]:
    """Aligned crops of the largest face of each photo; photos without one are reported and skipped."""
    return gather_faces(paths, lambda path: detected_crop(path, detector))


def similarity_matrix(embed, images: torch.Tensor) -> torch.Tensor:
    features = torch.nn.functional.normalize(embed(images).float(), dim=1)
    return features @ features.T


def format_matrix(names: Sequence[str], sim: torch.Tensor) -> str:
    width = max(8, *(len(n) for n in names))
    rows = [" " * width + "".join(f"{n[:width]:>{width + 1}}" for n in names)]
    for name, row in zip(names, sim.tolist(), strict=True):
        rows.append(f"{name:<{width}}" + "".join(f"{v:>{width + 1}.3f}" for v in row))
    return "\n".join(rows)


@main_guard("inference.py")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = args.images or sorted(SAMPLES.glob("*.jpg"))
    use_threads("batched")  # before the model adds to the machine's load (core.threads)
    try:
        model = args.model or find_model(DEFAULT_MODEL, DEFAULT_MODEL_URL)
        color = args.color or ("bgr" if args.model is None else None)
        embed = load_embedder(model, backbone=args.backbone, color=color)
        if args.aligned:
            kept, images = gather_faces(paths, aligned_crop)
        else:
            kept, images = detect_and_align(paths, YuNetDetector(args.detector))
    except (OSError, ValueError) as err:  # the model or the detector
        print(f"inference.py: {error_line(err)}", file=sys.stderr)
        return 2
    if len(kept) < 2:
        print(f"inference.py: {len(kept)} of {len(paths)} photos gave a face; a similarity matrix needs 2",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"model: {model} ({embed.color.upper()} input)")
    print(format_matrix([p.name for p in kept], similarity_matrix(embed, images)))
    if len(kept) < len(paths):
        print(f"inference.py: {len(paths) - len(kept)} of {len(paths)} photos left out (named above)",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
