"""The feature cache of every evaluator: features computed once per model and image set are saved in a
folder and read back by a later run (another flip fusion, other IJB switches, a resumed MegaFace run)
instead of running the model again.

An entry is one file of the folder, named by the evaluator from the set and a key that names the model
(:func:`evaluation.embedders.embedder_key`), e.g. ``lfw__<key>.npz``:

* ``<stem>.npz`` (:meth:`FeatureCache.features`): ``original`` and ``flipped`` features (N, D) (``flipped``
  empty when no flips were embedded) and the arrays that say which images they belong to (``recorded``:
  IJB's image names and landmarks, TinyFace's file list); ``notes`` are stored beside them unchecked. An
  entry answers a request for the same number of images whose recorded arrays are equal, with flips when
  the request needs them; otherwise one line on stderr says why and the features are extracted afresh and
  saved over it.
* ``<stem>.npy`` (:meth:`FeatureCache.fused`): one float32 array (MegaFace's flip-fused unit features,
  whose stem names the model, the fusion and the file list), read back memory-mapped; it answers a request
  for the same number of rows.

Entries are written atomically, so an interrupted run never leaves a truncated one behind.
:func:`read_features` is the strict reader (an error naming the file) for a features file given by hand
(IJB's re-scoring).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from core.fileio import atomic_write

Features = tuple[np.ndarray, np.ndarray | None]


def _names(array: np.ndarray) -> bool:
    """Whether a recorded array lists the images themselves (file or image names)."""
    return array.ndim == 1 and array.dtype.kind in "USO"


def read_features(
    path: str | os.PathLike[str],
    rows: int,
    flip: bool = True,
    recorded: Mapping[str, np.ndarray] | None = None,
    source: str = "",
) -> Features:
    """(original, flipped or None) of a features file written by :func:`write_features` for ``rows``
    images; ``recorded`` arrays must equal those saved with them. Anything else is a ``ValueError``
    naming the file and the difference (``source`` names the images asked for, e.g. ``ijbc in /data/IJBC``).
    """
    path = Path(path)
    recorded = dict(recorded or {})
    try:
        saved = np.load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a features file of this evaluator: {err}") from None
    with saved:
        missing = {"original", "flipped", *recorded} - set(saved.files)
        if missing:
            lacking = ", ".join(sorted(missing))
            raise ValueError(f"{path}: not a features file of this evaluator (no {lacking})")
        for name, expected in recorded.items():
            value = saved[name]
            if _names(np.asarray(expected)) and (
                len(value) != len(expected) or not np.array_equal(value, expected)
            ):
                raise ValueError(
                    f"{path}: features of {len(value)} other images than the {len(expected)} of {source}"
                )
            if not np.array_equal(value, expected):
                raise ValueError(f"{path}: features computed from other {name} than those of {source}")
        original, flipped = saved["original"], saved["flipped"]
    if original.ndim != 2 or len(original) != rows:
        raise ValueError(
            f"{path}: features of {len(original)} images, not of the {rows} of {source or 'the set'}"
        )
    if not flip:
        return original, None
    if flipped.shape != original.shape:
        raise ValueError(f"{path}: holds no features of the flipped images")
    return original, flipped


def write_features(
    path: str | os.PathLike[str],
    original: np.ndarray,
    flipped: np.ndarray | None,
    recorded: Mapping[str, np.ndarray] | None = None,
    notes: Mapping[str, object] | None = None,
) -> Path:
    """Save features (and the arrays that identify their images) as ``path`` (``.npz``), atomically."""
    path = Path(path)
    empty = np.zeros((0,), np.float32)
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **dict(notes or {}), **dict(recorded or {}), original=original,
                 flipped=empty if flipped is None else flipped)  # fmt: skip
    return path


class FeatureCache:
    """Saved features in ``folder`` (None: a cache that keeps nothing, every request extracts).

    ``prog`` prefixes the line printed when an entry cannot answer a request."""

    def __init__(self, folder: str | os.PathLike[str] | None, prog: str = "evaluate") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.prog = prog

    def path(self, stem: str, suffix: str = ".npz") -> Path | None:
        """The file of entry ``stem`` (None without a folder)."""
        return self.folder / f"{stem}{suffix}" if self.folder is not None else None

    def features(
        self,
        stem: str,
        compute: Callable[[], Features],
        rows: int,
        flip: bool = True,
        recorded: Mapping[str, np.ndarray] | None = None,
        notes: Mapping[str, object] | None = None,
        source: str = "",
    ) -> Features:
        """(original, flipped or None) of ``rows`` images: entry ``stem`` when it fits the request (see the
        module notes), else ``compute()``, saved as that entry."""
        path = self.path(stem)
        if path is not None and path.is_file():
            try:
                return read_features(path, rows, flip, recorded, source)
            except ValueError as err:
                print(f"{self.prog}: {err}; extracting afresh", file=sys.stderr)
        original, flipped = compute()
        if path is not None:
            write_features(path, original, flipped, recorded, notes)
        return original, flipped

    def fused(self, stem: str, compute: Callable[[], np.ndarray], rows: int) -> np.ndarray:
        """One float32 (rows, D) array, memory-mapped from entry ``stem`` (``.npy``): read back when it has
        ``rows`` rows, else ``compute()``d and saved there first. Needs a folder."""
        path = self.path(stem, ".npy")
        if path is None:
            raise ValueError("FeatureCache.fused needs a folder: its features are read back memory-mapped")
        if path.is_file():
            saved = np.load(path, mmap_mode="r")
            if saved.ndim == 2 and saved.shape[0] == rows:
                return saved
        with atomic_write(path, "wb") as fh:
            np.save(fh, np.asarray(compute(), dtype=np.float32))
        return np.load(path, mmap_mode="r")
