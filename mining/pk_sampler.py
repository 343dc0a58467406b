"""P identities x K images per batch (docs/methods.md §3.10), deterministic per seed and epoch, split
across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from core.distributed import get_rank, get_world_size


class PKSampler(Sampler[list[int]]):
    """Batch sampler: each batch holds ``p`` distinct identities with ``k`` images each.

    Identities with fewer than ``k`` images repeat images; identities with fewer than ``min_images`` are
    left out (listed in ``skipped``). Every identity appears once per epoch (the last incomplete group is
    dropped). Batches are dealt round-robin to ranks; call :meth:`set_epoch` each epoch.

    Args:
        positions: class id -> dataset positions of its images (``source.indices_per_identity()``; works
            for RecordIO sets and image folders alike).
    """

    def __init__(
        self,
        positions: dict[int, np.ndarray],
        p: int,
        k: int,
        seed: int = 0,
        min_images: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if p < 2 or k < 1:
            raise ValueError(f"PK sampling needs p >= 2 identities and k >= 1 images, got p={p}, k={k}")
        self.positions = {c: np.asarray(v) for c, v in positions.items() if len(v) >= min_images}
        self.skipped = sorted(c for c, v in positions.items() if len(v) < min_images)
        if len(self.positions) < p:
            raise ValueError(f"only {len(self.positions)} identities have >= {min_images} images; p is {p}")
        self.p, self.k, self.seed = p, k, seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        batches = len(self.positions) // self.p
        return batches // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        ids = np.array(sorted(self.positions))
        rng.shuffle(ids)
        total = len(self) * self.world_size
        for b in range(self.rank, total, self.world_size):
            batch: list[int] = []
            # every rank draws the same stream; the image choice depends on (seed, epoch, batch) only
            batch_rng = np.random.default_rng([self.seed, self.epoch, b])
            for c in ids[b * self.p : (b + 1) * self.p]:
                members = self.positions[int(c)]
                batch.extend(batch_rng.choice(members, size=self.k, replace=len(members) < self.k).tolist())
            yield batch
