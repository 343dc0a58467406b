"""Host tensors backed by a file instead of anonymous memory, for the large ones a checkpoint assembles.

Writing a checkpoint of Partial FC at millions of identities gathers the class centres and their optimizer
state on rank 0 (at WebFace42M's 2,059,906 classes and 512 dimensions, 4.2 GB each in fp32). In anonymous
memory they would raise rank 0's resident memory by the whole head for as long as the save lasts, and
the kernel could not page them out. :func:`host_empty` gives such a tensor pages of a file instead: a
temporary file in the run's folder (:func:`use_directory`), unlinked as soon as it is mapped, so it is
gone when the tensor is freed, even after a crash. The kernel writes its pages back and drops them under
memory pressure, so what the save holds in memory is bounded by what the machine can spare, not by the
head's size; ``torch.save`` reads them like any other tensor.

Tensors under :data:`MIN_BYTES`, and every tensor while no directory is set, are ordinary ``torch.empty``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

# Tensors from this size up are file-backed once a directory is set.
MIN_BYTES = 256 * 2**20
_directory: list[Path] = []


def use_directory(path: str | os.PathLike[str] | None) -> None:
    """Back large host tensors by files in ``path`` (None: anonymous memory, the default). A folder on the
    filesystem of the checkpoints: it needs the free space of the largest gathered tensors."""
    _directory.clear()
    if path is not None:
        _directory.append(Path(path))


def spill_directory() -> Path | None:
    """The folder set by :func:`use_directory`, or None."""
    return _directory[0] if _directory else None


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` and ``dtype``: file-backed (see the module notes) when a
    directory is set and it takes at least :data:`MIN_BYTES`, else ``torch.empty``."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    directory = spill_directory()
    if directory is None or nbytes < MIN_BYTES or numel == 0:
        return torch.empty(shape, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".spill.", suffix=".tmp", dir=directory)
    try:
        os.ftruncate(fd, nbytes)  # sparse: blocks are taken as rows are written
        tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the data; the name is gone
    return tensor.view(shape)
