"""The teacher of the ``distillation`` objective: any embedder the evaluators accept, and its features of the
training images, computed once and cached on disk or computed on each batch.

The teacher is read by :func:`evaluation.embedders.load_embedder` (an ONNX model, a checkpoint of this
framework, an insightface ``model.pt`` or an AdaFace ``.ckpt`` with ``teacher_backbone``), so it gets the
uint8 RGB faces as the evaluators feed them and converts them to its own colour order, input size and
scaling.

Two ways to get its features (:func:`teacher_mode`):

* ``cache``: when the training augmentation changes no pixel but the horizontal flip, the teacher embeds
  every training image and its flip once; the features are saved by :class:`evaluation.cache.FeatureCache`
  (the evaluators' cache, atomic writes) under ``<cache_dir>/<data>__<teacher>.npz`` and each batch looks up
  its rows, the flipped row for an image the epoch's transform flipped (:func:`flipped_positions` asks
  ``data.transforms.augment`` itself, with the image's ``(seed, epoch, index)`` stream);
* ``online``: with an augmentation that changes pixels (``crop``, ``low_res``, ``photometric``, ``jitter``,
  ``mask``) the teacher embeds each batch as it was augmented (the epoch's images, read again by position).

The cache entry is keyed by the teacher file (its resolved path, size and modification time in
nanoseconds, not its content: hashing a large model at every start would cost more than it saves) with the
colour order and input scaling, and by the data (the resolved ``data.root``, the size of its files, the
number of images and ``data.image_size``); the key is also stored inside the entry, which answers only a
request with the same key. A teacher file rewritten in place gets another modification time, so its old
features are never read.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.config import Config
from core.distributed import barrier, get_rank
from data.image_folder import is_image
from data.transforms import AugmentConfig, FaceTransform, augment
from evaluation.cache import FeatureCache
from evaluation.embedders import OnnxEmbedder, TorchEmbedder, load_embedder
from evaluation.extract import extract_dataset

# Augmentations that change the pixels of a face (the flip only mirrors them: its features are cached too).
PIXEL_AUGMENTATIONS = ("crop", "low_res", "photometric", "jitter", "mask")
MODES = ("auto", "cache", "online")


def pixel_augmentations(augment_cfg: AugmentConfig) -> list[str]:
    """The augmentations of ``data.augment`` that change pixels (probability above 0)."""
    return [name for name in PIXEL_AUGMENTATIONS if getattr(augment_cfg, name) > 0]


def teacher_mode(cfg: Config, mode: str) -> tuple[str, str]:
    """(``cache`` or ``online``, why) for ``teacher_mode`` ``mode`` (``auto`` decides from
    ``data.augment``)."""
    changing = pixel_augmentations(cfg.data.augment)
    if mode == "online":
        return "online", "teacher_mode: online"
    if mode == "cache":
        return "cache", "teacher_mode: cache"
    if changing:
        return (
            "online",
            f"data.augment changes pixels ({', '.join(changing)}): the teacher runs on each batch",
        )
    return "cache", "data.augment flips at most: features of every image and its flip cached once"


def flipped_positions(augment_cfg: AugmentConfig, seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Whether the training transform of ``epoch`` flips each image of ``indices`` (bool array), asked of
    :func:`data.transforms.augment` with each image's stream ``(seed, epoch, index)`` on a probe picture.
    Meaningful when no augmentation changes pixels (as in ``cache`` mode)."""
    probe = np.zeros((1, 2, 3), np.uint8)
    probe[0, 1] = 1
    out = np.empty(len(indices), bool)
    for k, i in enumerate(indices):
        seen = augment(probe.copy(), augment_cfg, np.random.default_rng([seed, epoch, int(i)]))
        out[k] = bool(seen[0, 0, 0] == 1)
    return out


def file_identity(path: Path) -> str:
    """resolved path, size and modification time (ns) of a file."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def data_identity(cfg: Config, images: int) -> str:
    """The training data as the cache knows it: the resolved ``data.root``, the total size of its files
    (the ``.rec``/``.idx`` pair, or the images of a folder), the number of images and the decoded size."""
    root = Path(cfg.data.root)
    if root.is_dir():
        recs = sorted(root.glob("*.rec")) + sorted(root.glob("*.idx"))
        files = recs or [p for p in root.rglob("*") if p.is_file() and is_image(p)]
    else:
        prefix = root.with_suffix("") if root.suffix in (".rec", ".idx") else root
        files = [p for p in (prefix.with_suffix(".rec"), prefix.with_suffix(".idx")) if p.is_file()]
    size = sum(Path(p).stat().st_size for p in files)
    return f"{root.resolve()}|{size}|{images}|{cfg.data.image_size}"


class UnaugmentedImages(torch.utils.data.Dataset):
    """Item i: the training image at position i as stored (decoded, no augmentation), uint8 (3, H, W)."""

    def __init__(self, source: object, image_size: int) -> None:
        self.source, self.transform = source, FaceTransform(image_size=image_size, train=False)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        buf, _ = self.source[i]  # type: ignore[index]
        return self.transform(buf, f"image {i}")


class Teacher:
    """Teacher features (float32, one row per image) of training batches, cached or online (see the
    module notes). ``calls`` counts the teacher's forward passes on batches (the cache's included)."""

    def __init__(
        self,
        cfg: Config,
        path: str,
        backbone: str | None,
        color: str | None,
        mode: str,
        cache_dir: str,
        batch_size: int,
        load: Callable[[np.ndarray], torch.Tensor],
        epoch: Callable[[], int],
        source: object,
    ) -> None:
        self.cfg, self.path, self.load, self.epoch = cfg, Path(path), load, epoch
        self.batch_size = batch_size
        self.embedder: TorchEmbedder | OnnxEmbedder = load_embedder(self.path, backbone, color)
        self.mode, self.reason = teacher_mode(cfg, mode)
        self.calls = 0
        self.original: torch.Tensor | None = None
        self.flipped: torch.Tensor | None = None
        self.cache_file: Path | None = None
        if self.mode == "cache":
            self.fill_cache(cache_dir, source)
        self.dim = int(self.original.shape[1]) if self.original is not None else self.probe_dim()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.embedder(images)

    def probe_dim(self) -> int:
        size = self.cfg.data.image_size
        return int(self.embedder(torch.zeros((1, 3, size, size), dtype=torch.uint8)).shape[1])

    def key(self, images: int) -> tuple[str, str]:
        """(entry stem, the full key stored inside it)."""
        scaling = self.embedder.normalization
        teacher = f"{file_identity(self.path)}|{self.embedder.color}|{scaling}"
        full = f"teacher {teacher} data {data_identity(self.cfg, images)}"
        digest = hashlib.sha256(full.encode()).hexdigest()[:16]
        return f"distill_{Path(self.cfg.data.root).stem}__{self.path.stem}_{digest}", full

    def fill_cache(self, cache_dir: str, source: object) -> None:
        """Read the entry of this teacher and data, or embed every image and its flip and save it (rank 0;
        the other ranks wait, then read it)."""
        images = len(source)  # type: ignore[arg-type]
        stem, full = self.key(images)
        cache = FeatureCache(cache_dir, prog="distillation")
        self.cache_file = cache.path(stem)
        recorded = {"key": np.array([full])}

        def compute() -> tuple[np.ndarray, np.ndarray | None]:
            print(f"distillation: teacher {self.path.name} embeds {images} training images and their flips "
                  f"once -> {self.cache_file}", file=sys.stderr)  # fmt: skip
            return extract_dataset(
                self, UnaugmentedImages(source, self.cfg.data.image_size), self.batch_size, flip=True,
                num_workers=self.cfg.data.num_workers, progress=f"teacher {self.path.name}",
            )  # fmt: skip

        if get_rank() == 0:
            cache.features(
                stem, compute, images, flip=True, recorded=recorded, source=str(self.cfg.data.root)
            )
        barrier()
        original, flipped = cache.features(stem, compute, images, flip=True, recorded=recorded)
        self.original, self.flipped = torch.from_numpy(original), torch.from_numpy(flipped)

    def features(self, indices: torch.Tensor) -> torch.Tensor:
        """The teacher's features of the images at ``indices`` as this epoch's transform made them."""
        positions = indices.cpu().numpy()
        if self.mode == "online":
            return self(self.load(positions))
        flips = flipped_positions(self.cfg.data.augment, self.cfg.experiment.seed, self.epoch(), positions)
        rows = torch.from_numpy(positions).long()
        out = self.original[rows].clone()
        if flips.any():
            mask = torch.from_numpy(flips)
            out[mask] = self.flipped[rows[mask]]
        return out
