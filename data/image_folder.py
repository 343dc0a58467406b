"""Face images in ``root/<identity>/<image>`` folders (docs/methods.md §1.2), with the same contract as
RecordIO.

Identities are the sub-folders in sorted order, labelled ``0..C-1``; images are sorted by file name within
each identity, so every identity is one contiguous range of positions (what PK samplers need).
``self[i]`` is ``(encoded bytes, int label)``; decoding happens in the transform pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# The one list of image suffixes (every format data.decode reads); the RecordIO packer uses it too.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}
)


class FolderLayoutError(ValueError):
    """The folder is not laid out as ``root/<identity>/<image>``; the message says what is wrong."""


class ImageFolderFaces:
    """Random access to the images of an identity-per-folder tree.

    Args:
        root: folder with one sub-folder per identity.
        allow_empty: skip identity folders without images (listed in ``empty_identities``) instead of
            refusing the tree. Skipped folders get no label.
        skip_hint: how the caller's user asks for ``allow_empty`` (a command-line flag, say), named in the
            error about empty identity folders; None when the caller offers no way.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        allow_empty: bool = False,
        skip_hint: str | None = "allow_empty=True",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FolderLayoutError(f"{self.root}: image folder not found")
        self.ignored: list[Path] = []
        self.empty_identities: list[str] = []
        self.classes: list[str] = []
        paths: list[Path] = []
        ranges: list[tuple[int, int]] = []
        loose = []
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir():
                (loose if entry.suffix.lower() in IMAGE_SUFFIXES else self.ignored).append(entry)
                continue
            entries = sorted(entry.iterdir())
            images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            self.ignored.extend(
                p for p in entries if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            )
            if not images:
                self.empty_identities.append(entry.name)
                continue
            self.classes.append(entry.name)
            ranges.append((len(paths), len(paths) + len(images)))
            paths.extend(images)
        if loose:
            raise FolderLayoutError(
                f"{self.root}: images directly under the root ({loose[0].name}, ...): "
                "expected root/<identity>/<image>"
            )
        if self.empty_identities and not allow_empty:
            shown = ", ".join(self.empty_identities[:10])
            how = f", or skip them with {skip_hint}" if skip_hint else ""
            raise FolderLayoutError(
                f"{self.root}: {len(self.empty_identities)} identity folder(s) without images: {shown}; "
                f"add images to them or remove them{how}"
            )
        if not paths:
            raise FolderLayoutError(f"{self.root}: no identity folders with images")
        self._paths = paths
        self.identity_ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        self._labels = np.repeat(
            np.arange(len(ranges), dtype=np.int64), self.identity_ranges[:, 1] - self.identity_ranges[:, 0]
        )

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def num_images(self) -> int:
        return len(self._paths)

    @property
    def num_identities(self) -> int:
        return len(self.classes)

    def labels(self) -> np.ndarray:
        """Class id of every image, by position."""
        return self._labels

    def indices_per_identity(self) -> dict[int, np.ndarray]:
        """Image positions of each class id (the same contract as the RecordIO reader)."""
        return {c: np.arange(first, end) for c, (first, end) in enumerate(self.identity_ranges.tolist())}

    def path(self, i: int) -> Path:
        if not 0 <= i < len(self._paths):
            raise IndexError(f"{self.root}: image index {i} out of range 0..{len(self._paths) - 1}")
        return self._paths[i]

    def label(self, i: int) -> int:
        self.path(i)
        return int(self._labels[i])

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.path(i).read_bytes(), int(self._labels[i])

    def __repr__(self) -> str:
        return f"ImageFolderFaces({str(self.root)!r}, images={len(self)}, identities={self.num_identities})"
