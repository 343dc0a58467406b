"""Packing an image folder ``<root>/<identity>/<image>`` into ``OUT.rec``/``.idx``/``.lst``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.fileio import atomic_write
from data.image_folder import ImageFolderFaces
from data.recordio.format import JPEG_SOI, pack
from data.recordio.writer import RecordIOWriter


def pack_folder(
    folder: str | os.PathLike[str],
    out_prefix: str | os.PathLike[str],
    quality: int = 95,
    image_size: int | None = 112,
    resize: bool = False,
    allow_empty: bool = False,
    overwrite: bool = True,
    skip_hint: str | None = "allow_empty=True",
) -> dict[str, Any]:
    """Pack ``folder/<identity>/<image>`` into ``OUT.rec``, ``OUT.idx`` and ``OUT.lst`` (InsightFace layout).

    Identities are the sub-folders in sorted order, labelled ``0..C-1`` (listed by
    :class:`~data.image_folder.ImageFolderFaces`); images are taken in sorted order within each. Record 0 is
    the meta header (``flag=2``, labels ``[N+1, N+1+C]``), keys ``1..N`` are the images (label = class id,
    ``id`` = key), keys ``N+1..N+C`` one record per identity with labels ``[first, end)``. Every image is
    decoded first, so a damaged file is refused, not packed. An image that is not ``image_size`` x
    ``image_size`` (None: any size) is refused, naming the file and both sizes, unless ``resize`` scales
    it (square images only). JPEGs of the right size are stored as their bytes, unchanged; other images
    (PNG, BMP, PGM, resized ones, ...) are re-encoded as 3-channel JPEG at ``quality`` (95). ``OUT.lst``
    lists ``key<TAB>label<TAB>relative path`` in ``im2rec`` format. Files without an image suffix are not
    packed and are listed under ``ignored`` in the returned summary. With ``overwrite=False`` existing
    outputs are refused; otherwise they are replaced atomically, and only once the pack is complete.
    ``allow_empty`` skips identity folders without images (``skip_hint`` words that option for the error).
    """
    folder, out_prefix = Path(folder), Path(out_prefix)
    if image_size is not None and image_size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {image_size}")
    faces = ImageFolderFaces(folder, allow_empty=allow_empty, skip_hint=skip_hint)
    rec_path, idx_path, lst_path = (
        out_prefix.with_name(out_prefix.name + s) for s in (".rec", ".idx", ".lst")
    )
    if not overwrite:
        for target in (rec_path, idx_path, lst_path):
            if target.exists():
                raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    num_images, ranges = faces.num_images, faces.identity_ranges.tolist()
    lst_lines, counts = [], {"kept": 0, "reencoded": 0, "resized": 0}
    with RecordIOWriter(rec_path, idx_path) as writer:
        writer.write(0, pack([num_images + 1, num_images + 1 + len(ranges)], b""))
        for label, (first, end) in enumerate(ranges):
            for pos in range(first, end):
                path, key = faces.path(pos), pos + 1
                data, how = _face_bytes(path, quality, image_size, resize)
                counts[how] += 1
                writer.write(key, pack(float(label), data, id=key))
                lst_lines.append(f"{key}\t{float(label):f}\t{path.relative_to(folder).as_posix()}\n")
        for label, (first, end) in enumerate(ranges):
            key = num_images + 1 + label
            writer.write(key, pack([first + 1, end + 1], b"", id=key))
        with atomic_write(lst_path, "wb") as lst:
            lst.write("".join(lst_lines).encode())
    return {
        "rec": str(rec_path),
        "idx": str(idx_path),
        "lst": str(lst_path),
        "images": num_images,
        "identities": len(ranges),
        "image_size": image_size,
        "reencoded": counts["reencoded"],
        "resized": counts["resized"],
        "ignored": [str(p) for p in faces.ignored],
    }


def _face_bytes(path: Path, quality: int, size: int | None, resize: bool) -> tuple[bytes, str]:
    """What to store for one image, and how it was made: ``kept`` (a JPEG of the right size, as it is),
    ``reencoded`` (another format, as JPEG) or ``resized``."""
    import cv2
    import simplejpeg

    from data.decode import ImageSizeError, decode_rgb, encode_jpeg, image_format

    data = path.read_bytes()

    def wrong_size(width: int, height: int) -> ImageSizeError:
        return ImageSizeError(
            f"{path}: {width}x{height} image, but the faces of this set are {size}x{size} (--image-size); "
            f"align it to {size}x{size} first, or pass --resize to scale it"
        )

    if size is not None and not resize and image_format(data) == "JPEG":
        try:  # the header alone: a huge photo is refused before it is decoded
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # decode_rgb below says what is wrong with it
        else:
            if (height, width) != (size, size):
                raise wrong_size(width, height)
    img = decode_rgb(data, str(path))
    height, width = img.shape[:2]
    if size is not None and (height, width) != (size, size):
        if not resize:
            raise wrong_size(width, height)
        if height != width:
            raise ImageSizeError(
                f"{path}: {width}x{height} image is not square; --resize scales square crops only"
            )
        interpolation = cv2.INTER_AREA if height > size else cv2.INTER_CUBIC
        return encode_jpeg(cv2.resize(img, (size, size), interpolation=interpolation), quality), "resized"
    if data.startswith(JPEG_SOI):
        return data, "kept"
    return encode_jpeg(img, quality), "reencoded"
