"""``info`` and ``check``: read a rec (or an image folder) as a training run would and report every problem.

``info`` reads the index, the meta header, the identity records and the 8-byte part header of every
record (magic number, length within the file), so a damaged record anywhere is an error, not a healthy
summary. ``check`` reads everything: every image is decoded and its size checked, every label is compared
with the identity table; it reports all problems, one line each.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from core.threads import fork_safe_opencv
from data.image_folder import ImageFolderFaces
from data.recordio.dataset import RecordIOFaceSet
from data.recordio.format import RecordIOError, class_id
from data.recordio.reader import IndexedRecordIO, find_recordio


def _command_rec(path: str | os.PathLike[str]) -> Path:
    """The ``.rec`` a command was given; a folder without ``train.rec`` is named as such."""
    path = Path(path)
    rec = find_recordio(path)
    if rec is not None:
        return rec
    if path.is_dir():
        subfolders = any(entry.is_dir() for entry in path.iterdir())
        what = (
            "; it holds sub-folders: as an image folder, `check` reads it and `pack` packs it"
            if subfolders
            else ""
        )
        raise RecordIOError(f"{path} is a folder without train.rec (and train.idx){what}")
    return path  # IndexedRecordIO says that it does not exist


def _more(problems: Sequence[str], rec: Path) -> str:
    """The first problem, and how to see them all."""
    rest = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
    return f"{problems[0]}{rest}; `python -m data.recordio check {rec}` lists every problem"


def info(rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Summary of a rec: paths, size, record count, header layout, image and identity counts.

    ``rec_path`` may be a folder holding ``train.rec``. Every record's part header and the identity table
    are checked first (:meth:`IndexedRecordIO.scan`, :meth:`RecordIOFaceSet.identity_problems`); a
    damaged file is a :class:`RecordIOError` naming the first problem, never a healthy summary.
    """
    rec = _command_rec(rec_path)
    records = IndexedRecordIO(rec, idx_path)
    damaged = [problem for _, problem in records.scan()]
    if damaged:
        records.close()
        raise RecordIOError(_more(damaged, rec))
    faces = RecordIOFaceSet(rec, records=records)
    try:
        table = faces.identity_problems()
        if table:
            raise RecordIOError(_more(table, rec))
        return {
            "path": str(faces.rec_path),
            "idx": str(faces.records.idx_path),
            "size": faces.records.size,
            "records": len(faces.records),
            "header": faces.has_header,
            "images": faces.num_images,
            "identities": faces.num_identities,
        }
    finally:
        faces.close()


# ``check`` runs its image chunks in worker processes; each reads the source it was given once.
_CHECK: dict[str, Any] = {}


def _check_init(source: RecordIOFaceSet | ImageFolderFaces, image_size: int | None) -> None:
    _CHECK.update(source=source, image_size=image_size)


def _check_images(positions: np.ndarray) -> tuple[list[tuple[int, str]], np.ndarray]:
    """``(position, problem)`` for the images at ``positions`` that cannot be trained on, and their labels
    (``-1`` where the label cannot be read)."""
    from data.decode import DecodeError, ImageSizeError, decode_face

    source, size = _CHECK["source"], _CHECK["image_size"]
    problems, labels = [], np.full(len(positions), -1, np.int64)
    for n, i in enumerate(positions.tolist()):
        try:
            if isinstance(source, ImageFolderFaces):
                where = str(source.path(i))
                try:
                    image, labels[n] = source[i]
                except OSError as err:
                    raise DecodeError(f"{where}: cannot be read: {err.strerror or err}") from None
            else:
                header, image, _ = source._header(i, limit=None)
                where = f"{source.rec_path} key {source.key(i)}"
                labels[n] = class_id(header.labels[0], f"{source.rec_path}: key {source.key(i)}")
            decode_face(image, size, where)
        except (RecordIOError, DecodeError, ImageSizeError) as err:
            problems.append((i, str(err)))
    return problems, labels


def _check_all_images(
    source: RecordIOFaceSet | ImageFolderFaces,
    positions: np.ndarray,
    image_size: int | None,
    workers: int,
    found: Callable[[str], None],
) -> np.ndarray:
    """Labels of every image (-1 where unreadable), calling ``found`` for each problem, in position order."""
    labels = np.full(len(source), -1, np.int64)
    chunk = int(min(4096, max(64, len(positions) // (8 * max(1, workers)) + 1)))
    chunks = [positions[i : i + chunk] for i in range(0, len(positions), chunk)]
    if workers <= 1:
        _check_init(source, image_size)
        results: Iterator[tuple[list[tuple[int, str]], np.ndarray]] = map(_check_images, chunks)
        pool = None
    else:
        fork_safe_opencv()
        pool = ProcessPoolExecutor(
            workers, multiprocessing.get_context(), initializer=_check_init, initargs=(source, image_size)
        )
        results = pool.map(_check_images, chunks)
    try:
        for part, (problems, part_labels) in zip(chunks, results, strict=True):
            labels[part] = part_labels
            for _, problem in problems:
                found(problem)
    finally:
        _CHECK.clear()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return labels


def check(
    path: str | os.PathLike[str],
    idx_path: str | os.PathLike[str] | None = None,
    image_size: int | None = 112,
    workers: int = 1,
    allow_empty: bool = False,
    found: Callable[[str], None] = lambda problem: None,
) -> dict[str, Any]:
    """Read everything a training run would read and report every problem through ``found``, one line each.

    ``path`` is a ``.rec`` (a prefix, or a folder holding ``train.rec``) or an image folder
    ``<root>/<identity>/<image>``. For a RecordIO: every record's part chain (:meth:`IndexedRecordIO.scan`),
    every image (decoded, and ``image_size`` x ``image_size`` unless None), every label (a class id, and
    the class whose identity record holds the key: :meth:`RecordIOFaceSet.identity_problems`) and the
    keys the layout does not account for. For a folder: every image, decoded and sized. Decoding runs in
    ``workers`` processes. Returns a summary whose ``problems`` counts the lines; a fault that stops the
    reading altogether (no index, an unreadable meta header) is raised instead.
    """
    path, problems = Path(path), []

    def report(problem: str) -> None:
        problems.append(problem)
        found(problem)

    rec = find_recordio(path)
    if rec is None and path.is_dir():
        folder = ImageFolderFaces(path, allow_empty=allow_empty, skip_hint="--allow-empty")
        _check_all_images(folder, np.arange(len(folder)), image_size, workers, report)
        return {
            "path": str(path),
            "format": "folder",
            "images": folder.num_images,
            "identities": folder.num_identities,
            "image_size": image_size,
            "problems": len(problems),
        }
    rec = rec if rec is not None else path
    records = IndexedRecordIO(rec, idx_path, check_offsets=False)
    damaged = records.scan()
    for _, problem in damaged:
        report(problem)
    try:
        faces = RecordIOFaceSet(rec, records=records)
    except RecordIOError as err:
        records.close()
        if str(err) not in problems:
            report(str(err))
        raise RecordIOError(_more(problems, rec) + "; the layout cannot be read past it") from None
    try:
        bad_keys = np.asarray([key for key, _ in damaged], np.int64)
        todo = np.flatnonzero(~np.isin(faces._image_keys, bad_keys))
        labels = _check_all_images(faces, todo, image_size, workers, report)
        for problem in faces.identity_problems(labels):
            report(problem)
        if faces.has_header:
            assert faces._identity_keys is not None
            known = np.concatenate([[0], faces._image_keys, faces._identity_keys])
            stray = np.setdiff1d(records.keys, known)
            if stray.size:
                shown = ", ".join(str(k) for k in stray[:5].tolist()) + (", ..." if stray.size > 5 else "")
                last = len(faces) + len(faces._identity_keys)
                report(
                    f"{rec}: {stray.size} keys of the index lie outside the layout of the meta header "
                    f"(images 1..{len(faces)}, identities {len(faces) + 1}..{last}): {shown}; training "
                    "never reads them"
                )
        identities = (
            len(faces._identity_keys)
            if faces._identity_keys is not None
            else len(np.unique(labels[labels >= 0]))
        )
        return {
            "path": str(rec),
            "format": "recordio",
            "records": len(records),
            "images": faces.num_images,
            "identities": identities,
            "image_size": image_size,
            "problems": len(problems),
        }
    finally:
        faces.close()
