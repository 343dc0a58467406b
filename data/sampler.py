"""The training order: global batches that resume mid-epoch and do not depend on the number of processes.

Epoch e visits the images in the permutation drawn from ``(seed, e)``, cut into global batches of
G = batch_size x world_size x grad_accum images (the last partial batch is dropped). Global batch b is cut
into chunks of ``batch_size``; rank r's micro-batch a is chunk ``r * grad_accum + a``. So 2 processes with
64 images each see exactly the images 1 process sees with 2 accumulated micro-batches of 64.

Every image's augmentation is drawn from its own generator seeded by ``(seed, epoch, index)``: which
rank or DataLoader worker decodes it does not matter, and a resumed run draws what an uninterrupted one
would have drawn. Resuming needs only ``(epoch, step_in_epoch)``. :class:`PKBatchSampler` is the same
order made of P identities x K images groups for metric learning (``data.sampler: pk``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.config import ConfigError
from core.threads import fork_safe_opencv, loader_worker_init
from data.bad_records import RECORD_ERRORS, BadRecords, ScreenedLoader, describe_error
from data.transforms import FaceDataset, collate_faces, describe

REPLACEMENT_TRIES = 16  # random images tried for a bad record whose identity has no other readable one


def split_global_batches(
    order: np.ndarray, batch_size: int, world_size: int, rank: int, grad_accum: int = 1, start_step: int = 0
) -> Iterator[np.ndarray]:
    """The one split of an epoch's order across processes: global batch ``s`` is the ``s``-th run of
    G = ``batch_size x world_size x grad_accum`` entries of ``order`` (a last partial run is dropped), and
    rank ``r``'s micro-batch ``a`` of it is its chunk ``r * grad_accum + a``. Yields this rank's
    micro-batches from global batch ``start_step`` on."""
    global_batch = batch_size * world_size * grad_accum
    for step in range(start_step, len(order) // global_batch):
        batch = order[step * global_batch : (step + 1) * global_batch]
        for a in range(grad_accum):
            chunk = rank * grad_accum + a
            yield batch[chunk * batch_size : (chunk + 1) * batch_size]


def pk_groups(positions: dict[int, np.ndarray], p: int, k: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch of P x K groups (docs/methods.md §3.10): the identities in the order drawn from
    ``(seed, epoch)``, cut into groups of ``p`` (a last incomplete group is dropped, so every identity
    appears at most once); group ``b`` takes ``k`` images of each of its identities, drawn from
    ``(seed, epoch, b)`` (with repeats where an identity has fewer than ``k``)."""
    rng = np.random.default_rng([seed, epoch])
    ids = np.array(sorted(positions))
    rng.shuffle(ids)
    groups = []
    for b in range(len(ids) // p):
        group_rng = np.random.default_rng([seed, epoch, b])
        members = [np.asarray(positions[int(c)]) for c in ids[b * p : (b + 1) * p]]
        groups.append(
            np.concatenate([group_rng.choice(m, size=k, replace=len(m) < k) for m in members]).astype(
                np.int64
            )
        )
    return groups


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches as lists of ``(epoch, image index)`` keys."""

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if min(batch_size, world_size, grad_accum) < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad sampler geometry: batch {batch_size}, rank {rank} of {world_size}, accum {grad_accum}"
            )
        self.num_images, self.batch_size = num_images, batch_size
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size * grad_accum
        if self.global_batch > num_images:
            raise ConfigError(
                f"data.batch_size: the global batch of {self.global_batch} images ({batch_size} per process "
                f"x {world_size} processes x {grad_accum} accumulated) is larger than the dataset's "
                f"{num_images} images"
            )
        self.steps_per_epoch = num_images // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its optimizer step ``start_step`` on (mid-epoch resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_images)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_images)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        parts = split_global_batches(
            self.order(self.epoch),
            self.batch_size,
            self.world_size,
            self.rank,
            self.grad_accum,
            self.start_step,
        )
        for part in parts:
            yield [(self.epoch, int(i)) for i in part]


class KeyedFaceDataset(FaceDataset):
    """A :class:`FaceDataset` read by ``(epoch, i)`` keys -> (uint8 image, label, i), with image i's
    augmentation seeded by ``(seed, epoch, i)``; the index comes back for per-image bookkeeping
    (difficulty scores).

    A bad record (``data.bad_records``, :mod:`data.bad_records`) raises :class:`BadRecordError` in
    ``stop`` mode; in ``skip`` mode another image of the same identity takes its place, drawn from
    ``(seed, epoch, i)`` so a resumed run draws the same one (any image when the identity has no other
    readable one), and the index returned is that image's. Training reads through :meth:`loader`, whose
    workers return the problems with the batch instead of raising.
    """

    def __init__(self, dataset: FaceDataset, seed: int) -> None:
        super().__init__(dataset.source, dataset.transform)
        self.bad_records = dataset.bad_records
        self.seed = seed
        self._by_identity: dict[int, np.ndarray] | None = None

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:  # type: ignore[override]
        image, label, index, report = self.load(key)
        if report:
            self.bad_records.add_report(report)
        return image, label, index

    def load(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        """``(image, label, index, report)``: ``report`` is empty, or lists the bad records met (see
        :meth:`BadRecords.report`); in ``stop`` mode a bad record comes back as a black image labelled -1
        with its report, which the main process turns into the error before the image is used."""
        epoch, i = key
        try:
            return (*self._read(epoch, i), i, "")
        except RECORD_ERRORS as err:
            problem = describe_error(err)
        reports = [BadRecords.report(i, problem)]
        if self.bad_records.mode == "skip":
            for j in self._replacements(epoch, i):
                try:
                    return (*self._read(epoch, j), j, "\n".join(reports))
                except RECORD_ERRORS as err:
                    reports.append(BadRecords.report(j, describe_error(err)))
            tried = len(reports) - 1
            reports.append(
                BadRecords.report(
                    -1, f"{problem}; no readable image to train on in its place ({tried} tried)"
                )
            )
        size = self.transform.image_size
        blank = torch.zeros((3, size, size), dtype=torch.uint8)
        return blank, torch.tensor(-1, dtype=torch.int64), i, "\n".join(reports)

    def _read(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf, label = self.source[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        image = self.transform(buf, describe(self.source, i), rng=rng)
        return image, torch.tensor(label, dtype=torch.int64)

    def _replacements(self, epoch: int, i: int) -> Iterator[int]:
        """The other images of ``i``'s identity in a seeded order, then a few random images."""
        if self._by_identity is None:
            self._by_identity = self.source.indices_per_identity()
        rng = np.random.default_rng([self.seed, epoch, i, 1])  # [seed, epoch, i] is i's augmentation
        same = self._by_identity[int(self.source.labels()[i])]
        yield from rng.permutation(same[same != i]).tolist()
        yield from rng.integers(0, len(self.source), REPLACEMENT_TRIES).tolist()

    def loader(self, batch_sampler: Sampler, num_workers: int, pin_memory: bool = False) -> ScreenedLoader:
        """The training batches ``(images, labels, indices)`` in ``batch_sampler``'s order; bad records are
        reported to :attr:`bad_records` in the main process, whatever the number of workers."""
        if num_workers > 0:
            fork_safe_opencv()
        loader = DataLoader(
            _Reports(self), batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
            collate_fn=collate_faces, worker_init_fn=loader_worker_init,  # per-sample work: core.threads
        )  # fmt: skip
        return ScreenedLoader(loader, self.bad_records)


class _Reports(Dataset):
    """:meth:`KeyedFaceDataset.load` as a dataset: what DataLoader workers run."""

    def __init__(self, dataset: KeyedFaceDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        return self.dataset.load(key)


class PKBatchSampler(GlobalBatchSampler):
    """The global-batch order of :class:`GlobalBatchSampler` made of PK groups (docs/methods.md §3.10).

    Global batch b holds ``batch_size / k x world_size x grad_accum`` identities with ``k`` images each
    (:func:`pk_groups`: every identity once per epoch, images repeated when an identity has fewer than k),
    laid out so that every micro-batch holds whole groups: each rank's micro-batch is a PK batch of
    ``batch_size / k`` identities and its triplets are mined within it. So 2 processes see exactly what 1
    process sees with 2 accumulated micro-batches, and a run resumes mid-epoch as with the random order.
    """

    def __init__(
        self,
        positions: dict[int, np.ndarray],
        batch_size: int,
        k: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
    ) -> None:
        if k < 1 or batch_size % k or batch_size // k < 2:
            raise ConfigError(
                f"data.batch_size {batch_size} must be a multiple of data.pk_k {k} holding at least 2 "
                "identities per micro-batch"
            )
        identities = batch_size // k * world_size * grad_accum
        if len(positions) < identities:
            raise ConfigError(
                f"data.sampler pk: a global batch holds {identities} identities ({batch_size // k} per "
                f"micro-batch x {world_size} processes x {grad_accum} accumulated), the data has "
                f"{len(positions)}"
            )
        self.positions = {c: np.asarray(v) for c, v in positions.items()}
        self.identities, self.k = identities, k
        global_batch = batch_size * world_size * grad_accum
        super().__init__(
            len(positions) // identities * global_batch, batch_size, world_size, rank, grad_accum, seed
        )

    def order(self, epoch: int) -> np.ndarray:
        return np.concatenate(pk_groups(self.positions, self.identities, self.k, self.seed, epoch))
