"""Batched embedding extraction shared by training-time validation and the evaluators.

An *embedder* maps a uint8 RGB batch (N, 3, H, W) to features (N, D) (``core.embedders`` makes them from
backbones, checkpoints and ONNX files). :func:`extract` runs an embedder over an image array (and its
horizontal flips) in fixed batches; with ``shard=True`` under torch.distributed every rank embeds a
contiguous block and the blocks are gathered, so all ranks take part (none waits past the collective
timeout) and all get the same features.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.distributed import all_gather_padded, get_rank, get_world_size

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

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_stack_uint8,
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
    batch = torch.stack([torch.as_tensor(item) for item in items])
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(
            f"dataset items must be uint8 (3, H, W) images, got {batch.dtype} {tuple(batch.shape[1:])}"
        )
    return batch
