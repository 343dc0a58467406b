"""Batched embedding extraction shared by training-time validation and the evaluators.

An *embedder* maps a uint8 RGB batch (N, 3, H, W) to features (N, D) (``evaluation.embedders`` makes them
from backbones, checkpoints and ONNX files). :func:`extract` runs an embedder over an image array (and its
horizontal flips) in fixed batches; with ``shard=True`` under torch.distributed every rank embeds a
contiguous block and the blocks are gathered, so all ranks take part (none waits past the collective
timeout) and all get the same features.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from core.distributed import all_gather_padded, get_rank, get_world_size
from core.threads import fork_safe_opencv, loader_worker_init
from data.decode import decode_rgb

Embedder = Callable[[torch.Tensor], torch.Tensor]


def extract(
    embedder: Embedder,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    flip: bool = True,
    shard: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features of ``images``, features of their horizontal flips or None), float32 (N, D) arrays.

    Batches are fixed slices of the input, so the features do not depend on the batch size beyond
    floating-point noise (eval-mode models treat samples independently).
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"extract expects uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}"
        )
    n = images.shape[0]
    rank, world = (get_rank(), get_world_size()) if shard else (0, 1)
    if n < world:
        raise ValueError(f"{n} images cannot be shared by {world} processes")
    start, stop = rank * n // world, (rank + 1) * n // world
    original, flipped = [], []
    for i in range(start, stop, batch_size):
        batch = images[i : min(i + batch_size, stop)]
        original.append(embedder(batch).float().cpu())
        if flip:
            flipped.append(embedder(batch.flip(3)).float().cpu())

    def gather(parts: list[torch.Tensor]) -> np.ndarray:
        local = torch.cat(parts)
        return (torch.cat(all_gather_padded(local)) if world > 1 else local).numpy()

    return gather(original), gather(flipped) if flip else None


def extract_dataset(
    embedder: Embedder,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 256,
    flip: bool = True,
    num_workers: int = 0,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`extract` over a dataset whose item ``i`` is a uint8 (3, H, W) array or tensor (decoded and
    aligned in ``num_workers`` loader processes, in order), for sets too large to hold as one array.
    ``progress`` names a tqdm bar (None: no bar)."""
    from tqdm import tqdm

    if num_workers > 0:
        fork_safe_opencv()  # the loader parallelises over forked processes
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_stack_uint8,
        worker_init_fn=loader_worker_init,  # decode and align with one thread per worker (core.threads)
        persistent_workers=False,
    )
    original, flipped = [], []
    for batch in tqdm(loader, desc=progress, disable=progress is None, unit="batch"):
        o, f = extract(embedder, batch, batch_size=len(batch), flip=flip)
        original.append(o)
        if flip:
            flipped.append(f)
    if not original:
        raise ValueError("extract_dataset: the dataset is empty")
    return np.concatenate(original), np.concatenate(flipped) if flip else None


def _stack_uint8(items: list) -> torch.Tensor:
    # numpy: torch.stack of many small uint8 tensors is slow with several intra-op threads
    batch = torch.from_numpy(np.stack([np.asarray(item) for item in items]))
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(
            f"dataset items must be uint8 (3, H, W) images, got {batch.dtype} {tuple(batch.shape[1:])}"
        )
    return batch


class ImageFiles(torch.utils.data.Dataset):
    """Face crops read from image files for :func:`extract_dataset`: item ``i`` is ``paths[i]`` as uint8
    RGB (3, size, size).

    Files are decoded by :func:`data.decode.decode_rgb` (the pixels of ``cv2.imread``, in RGB; a corrupt or
    truncated file is an error naming it); a crop of another size is scaled with ``cv2.resize`` (bilinear,
    as the TinyFace and MegaFace evaluation scripts of the field do).
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], size: int = 112) -> None:
        self.paths, self.size = [Path(p) for p in paths], size

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """The decoded photo ``paths[i]``, uint8 RGB (H, W, 3)."""
        path = self.paths[i]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise OSError(f"{path}: cannot read image: {err.strerror or err}") from None
        return decode_rgb(data, str(path))

    def __getitem__(self, i: int) -> np.ndarray:
        img = self.read(i)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(img.transpose(2, 0, 1))


def extract_files(
    embedder: Embedder,
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int = 256,
    flip: bool = True,
    num_workers: int = 0,
    size: int = 112,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`extract_dataset` over the image files ``paths`` (:class:`ImageFiles`); features that should
    outlive the run go through :class:`evaluation.cache.FeatureCache`."""
    return extract_dataset(embedder, ImageFiles(paths, size), batch_size, flip, num_workers, progress)
