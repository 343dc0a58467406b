"""Face images in ``root/<identity>/<image>`` folders (docs/methods.md §1.2), with the same contract as
RecordIO, and the one lister of image files every part of the framework uses.

Identities are the sub-folders in sorted order, labelled ``0..C-1``; images are sorted by file name within
each identity, so every identity is one contiguous range of positions (what PK samplers need).
``self[i]`` is ``(encoded bytes, int label)``; decoding happens in the transform pipeline.

What counts as an image is decided here once (:data:`IMAGE_SUFFIXES`, :func:`is_image`,
:func:`list_images`, :func:`scan_identity_folders`): training on a folder, packing it into a RecordIO
(``data.recordio.pack_folder``), aligning photos (``scripts.prepare_dataset``), masking a copy
(``scripts.mask_dataset``) and listing MegaFace probes all see the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The one list of image suffixes (every format data.decode reads), compared in lower case.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}
)


def is_image(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s name ends in one of :data:`IMAGE_SUFFIXES` (any case); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """The image files directly in ``folder`` and everything else there (sub-folders, other files), each
    sorted by name."""
    images, others = [], []
    for entry in sorted(Path(folder).iterdir()):
        (images if entry.is_file() and is_image(entry) else others).append(entry)
    return images, others


@dataclass
class IdentityFolders:
    """What :func:`scan_identity_folders` found under a root."""

    identities: list[tuple[str, list[Path]]] = field(default_factory=list)  # sorted; each with images
    empty: list[str] = field(default_factory=list)  # identity folders without images
    loose: list[Path] = field(default_factory=list)  # images directly under the root
    ignored: list[Path] = field(default_factory=list)  # everything else: other files, nested folders


def scan_identity_folders(root: str | os.PathLike[str]) -> IdentityFolders:
    """The ``root/<identity>/<image>`` tree, identities and images sorted by name; nothing is refused here
    (:class:`ImageFolderFaces` says what it does not accept)."""
    found = IdentityFolders()
    for entry in sorted(Path(root).iterdir()):
        if not entry.is_dir():
            (found.loose if is_image(entry) else found.ignored).append(entry)
            continue
        images, others = list_images(entry)
        found.ignored.extend(others)
        if images:
            found.identities.append((entry.name, images))
        else:
            found.empty.append(entry.name)
    return found


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
        found = scan_identity_folders(self.root)
        self.ignored: list[Path] = found.ignored
        self.empty_identities: list[str] = found.empty
        self.classes: list[str] = [name for name, _ in found.identities]
        paths: list[Path] = []
        ranges: list[tuple[int, int]] = []
        for _, images in found.identities:
            ranges.append((len(paths), len(paths) + len(images)))
            paths.extend(images)
        loose = found.loose
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
