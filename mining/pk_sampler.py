"""P identities x K images per batch (docs/methods.md §3.10), deterministic per seed and epoch, split
across ranks.

A thin user of the training order in :mod:`data.sampler`: the groups are :func:`data.sampler.pk_groups`
and the split across ranks is :func:`data.sampler.split_global_batches`, the one every training order
uses (``data.sampler: pk`` in ``train.py`` builds :class:`data.sampler.PKBatchSampler` on the same two
functions). This class is the stand-alone batch sampler for loops of one's own.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from core.distributed import get_rank, get_world_size
from data.sampler import pk_groups, split_global_batches


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
        groups = pk_groups(self.positions, self.p, self.k, self.seed, self.epoch)
        # batch b goes to rank b % world_size: global batch s of the split is groups s*W .. s*W + W - 1
        for batch in split_global_batches(
            np.concatenate(groups), self.p * self.k, self.world_size, self.rank
        ):
            yield batch.tolist()
