"""Training-time augmentation (docs/methods.md §1.4) on uint8 RGB images, and the one input normalisation.

Images stay uint8 RGB H x W x 3 (numpy) through augmentation and uint8 3 x H x W (torch) through the data
loader; :func:`normalize_batch` turns a batch into the network input once, on the device.

AdaFace's augmenter applies each augmentation independently with its own probability: ``crop`` (a
random-resized-crop box pasted back at its place on a black canvas, no resize), ``low_res`` (down- then
up-sampling with random interpolations), ``photometric`` (brightness/contrast/saturation 0.5, hue 0, random
order, torchvision ColorJitter semantics) and ``jitter`` (pixel scale 1 + U(-0.2, 0.2)). insightface
recipes use the horizontal flip only. ``mask`` puts a synthetic face mask (``data.masks``) on the face first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from core.config import AugmentConfig
from data import masks
from data.bad_records import BadRecords
from data.decode import decode_face

PRESETS: dict[str, AugmentConfig] = {
    "arcface": AugmentConfig(flip=0.5),
    "adaface": AugmentConfig(flip=0.5, crop=0.2, low_res=0.2, photometric=0.2),
    # FRABSM's released data module never passes its jitter probability on, so jitter is off.
    "frabsm": AugmentConfig(flip=0.5, crop=0.15, low_res=0.15, photometric=0.15, jitter=0.0),
}
INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4)
LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as torchvision


# ------------------------------------------------------------------------------------ single operations


def hflip(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)``: 10 tries at a random area and aspect ratio, then
    the largest centred box of an admissible ratio (torchvision's ``RandomResizedCrop.get_params``)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_paste(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a random-resized-crop box of the face at its place, black elsewhere (no resize)."""
    top, left, h, w = crop_box(img.shape[0], img.shape[1], rng)
    out = np.zeros_like(img)
    out[top : top + h, left : left + w] = img[top : top + h, left : left + w]
    return out


def low_res(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down-sample the square image to side ``r * size`` (r ~ U(0.2, 1)) and back, each with a random
    interpolation, simulating low-resolution probes."""
    height, width = img.shape[:2]
    side = max(1, round(rng.uniform(0.2, 1.0) * height))
    down_interp, up_interp = (INTERPOLATIONS[i] for i in rng.integers(0, len(INTERPOLATIONS), size=2))
    small = cv2.resize(img, (side, side), interpolation=down_interp)
    return cv2.resize(small, (width, height), interpolation=up_interp)


def grayscale(img: np.ndarray) -> np.ndarray:
    """uint8 luma, truncated like torchvision's ``rgb_to_grayscale`` on uint8 tensors."""
    return (img.astype(np.float32) @ LUMA).astype(np.uint8)


def _blend(img: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    out = ratio * img.astype(np.float32) + (1.0 - ratio) * np.asarray(other, dtype=np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(img, 0.0, factor)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(img, float(grayscale(img).mean()), factor)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(img, grayscale(img)[:, :, None], factor)


def photometric(img: np.ndarray, rng: np.random.Generator, strength: float = 0.5) -> np.ndarray:
    """Brightness, contrast and saturation with factors ~ U(1 - s, 1 + s), in random order (hue 0)."""
    ops: list[Callable[[np.ndarray, float], np.ndarray]] = [
        adjust_brightness,
        adjust_contrast,
        adjust_saturation,
    ]
    factors = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    for k in rng.permutation(3):
        img = ops[k](img, float(factors[k]))
    return img


def jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Scale every pixel by ``1 + u``, u ~ U(-strength, strength)."""
    scale = 1.0 + rng.uniform(-strength, strength)
    return np.clip(np.rint(img.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def augment(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply each augmentation of ``cfg`` independently with its own probability."""
    if cfg.mask > 0 and rng.random() < cfg.mask:  # first: the mask sits on the template's landmarks
        overlays = masks.cached_overlays(cfg.mask_overlays) if cfg.mask_overlays else None
        img = masks.add_mask(img, rng, cfg.mask_types, overlays=overlays)
    if cfg.crop > 0 and rng.random() < cfg.crop:
        img = random_crop_paste(img, rng)
    if cfg.low_res > 0 and rng.random() < cfg.low_res:
        img = low_res(img, rng)
    if cfg.photometric > 0 and rng.random() < cfg.photometric:
        img = photometric(img, rng)
    if cfg.jitter > 0 and rng.random() < cfg.jitter:
        img = jitter(img, rng)
    if cfg.flip > 0 and rng.random() < cfg.flip:
        img = hflip(img)
    return img


# ---------------------------------------------------------------------------------------- the pipeline


class FaceTransform:
    """Encoded bytes -> decoded RGB -> augmentations -> uint8 tensor 3 x H x W.

    The random stream is derived from ``seed`` and ``torch.initial_seed()``, which PyTorch sets per
    DataLoader worker from the loader's generator: workers draw different augmentations, and a loader
    with a seeded ``torch.Generator`` repeats them exactly.
    """

    def __init__(
        self, cfg: AugmentConfig | None = None, image_size: int = 112, train: bool = True, seed: int = 0
    ):
        self.cfg = cfg if cfg is not None else AugmentConfig()
        if train and self.cfg.mask > 0:
            masks.check_augment(self.cfg.mask, self.cfg.mask_types, self.cfg.mask_overlays)
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None

    @property
    def rng(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._rng_key != key:
            worker = get_worker_info()
            self._rng = np.random.default_rng([self.seed, key[1], worker.id if worker else 0])
            self._rng_key = key
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rng": None, "_rng_key": None}  # workers derive their own stream

    def __call__(
        self, buf: bytes, source: str = "<bytes>", rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """``rng``: the augmentation stream for this image (default: this worker's stream)."""
        img = decode_face(buf, self.image_size, source)
        if self.train:
            img = augment(img, self.cfg, rng if rng is not None else self.rng)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@runtime_checkable
class FaceSource(Protocol):
    """The training data contract: what :class:`FaceDataset`, the samplers, the miners and ``train.py`` read.
    RecordIO sets (``data.recordio.RecordIOFaceSet``) and image folders
    (``data.image_folder.ImageFolderFaces``) both provide it; tests/test_contracts.py checks every one.

    * ``num_images`` (= ``len(source)``) images at positions ``0 .. num_images - 1``, of ``num_identities``
      identities with class ids ``0 .. num_identities - 1``;
    * ``source[i]``: ``(encoded image bytes, class id)`` of position ``i``;
    * ``labels()``: the class id of every position, an ``int64`` array of ``num_images``;
    * ``indices_per_identity()``: class id -> ascending positions of its images (every position once), for
      PK batches, mining and the replacement of bad records.

    A source travels to DataLoader workers by pickling. Error messages name an image by its ``path(i)`` when
    the source has one, else by ``rec_path`` and ``key(i)`` (:func:`describe`).
    """

    num_images: int
    num_identities: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[bytes, int]: ...

    def labels(self) -> np.ndarray: ...

    def indices_per_identity(self) -> dict[int, np.ndarray]: ...


def describe(source: object, i: int) -> str:
    """Where item ``i`` of a source comes from, for error messages."""
    if hasattr(source, "path"):
        return str(source.path(i))
    if hasattr(source, "key") and hasattr(source, "rec_path"):
        return f"{source.rec_path} key {source.key(i)}"
    return f"{type(source).__name__} item {i}"


class FaceDataset(Dataset):
    """(uint8 image tensor 3 x H x W, int64 label) for any :class:`FaceSource`. A record that cannot be
    read or decoded raises here; ``bad_records`` is the policy the training reader
    (:class:`data.sampler.KeyedFaceDataset`) applies instead."""

    def __init__(self, source: FaceSource, transform: FaceTransform) -> None:
        self.source = source
        self.transform = transform
        self.bad_records = BadRecords()

    @property
    def num_images(self) -> int:
        return self.source.num_images

    @property
    def num_identities(self) -> int:
        return self.source.num_identities

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf, label = self.source[i]
        return self.transform(buf, describe(self.source, i)), torch.tensor(label, dtype=torch.int64)


def _stack_tensors(batch: Any, *, collate_fn_map: dict | None = None) -> torch.Tensor:
    """A batch of equal-shaped CPU tensors stacked by numpy; in a loader worker into shared memory, as
    ``default_collate`` does, so the batch reaches the main process without another copy."""
    first = batch[0]
    if first.device.type != "cpu" or any(t.requires_grad for t in batch):
        return torch.stack(batch)
    shape = (len(batch), *first.shape)
    if any(t.shape != first.shape for t in batch):
        raise ValueError(f"cannot stack a batch of differently shaped tensors: {tuple(first.shape)} and "
                         f"{next(tuple(t.shape) for t in batch if t.shape != first.shape)}")  # fmt: skip
    out = torch.empty(shape, dtype=first.dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack([t.numpy() for t in batch], out=out.numpy())
    return out


def collate_faces(items: list) -> Any:
    """``torch.utils.data.default_collate``'s batch (same structure, values and dtypes), with every field
    of tensors stacked by numpy instead of ``torch.stack``: collating is per-sample work, kept out of
    PyTorch's intra-op pool (``core.threads``), where stacking 128 small faces with 2 threads on a busy
    machine took most of the loader's time."""
    from torch.utils.data._utils.collate import collate, default_collate_fn_map

    return collate(items, collate_fn_map={**default_collate_fn_map, torch.Tensor: _stack_tensors})


# ------------------------------------------------------------------------------------ normalisation


def normalize_batch(x: torch.Tensor, color: str = "rgb", size: int | None = None) -> torch.Tensor:
    """uint8 RGB N x 3 x H x W -> float32 network input ``(x/255 - 0.5)/0.5`` in ``color`` order.

    ``color="bgr"`` reverses the channels for models trained on BGR input (AdaFace, FRABSM). This is the
    one place where images become floats; call it on the device, after the transfer of the uint8 batch.
    ``size`` resizes the faces to ``size x size`` (bilinear with antialiasing) for a network whose input is
    smaller or larger than the stored crops (``model.input_size``); training and evaluation both resize
    here, so they see the same pixels.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 image batch, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize_batch expects N x 3 x H x W, got shape {tuple(x.shape)}")
    if color not in ("rgb", "bgr"):
        raise ValueError(f"color must be 'rgb' or 'bgr', got {color!r}")
    out = x.float().div_(127.5).sub_(1.0)
    if size is not None and tuple(out.shape[2:]) != (size, size):
        out = torch.nn.functional.interpolate(
            out, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return out.flip(1) if color == "bgr" else out
