"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old one.

A write goes to ``.<name>.<8 random characters>.tmp`` beside its target and is renamed over it when complete.
A process killed mid-write leaves that temporary file behind (for an IResNet-100 checkpoint 1-2 GB);
:func:`remove_stale_temp_files` deletes those of a folder, and nothing else.

A write that the file system refuses (disk full, read-only folder, a path under a file) raises
:class:`WriteError`, whose message is one line naming the target and the system's reason, whatever layer
met the error first (``torch.save`` reports a full disk as "unexpected pos ..." with the ENOSPC only in
its context); :func:`describe_os_error` words any other ``OSError`` the same way.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# ".<target>.<tag>.tmp": mkstemp's 8-character tag is drawn from [a-z0-9_], temp_path's from hex digits
TEMP_FILE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


class WriteError(OSError):
    """A file the system would not let us write: ``str()`` is "cannot write PATH: REASON" (``strerror``)."""

    def __init__(self, path: str | os.PathLike[str], cause: OSError, reason: str = "") -> None:
        super().__init__(cause.errno, reason or cause.strerror or str(cause), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite its own signature
        return WriteError, (self.filename, OSError(self.errno, self.strerror))


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: "PATH: REASON" (both paths of a rename), or its own message when it
    names no file (a ``FileNotFoundError`` raised with a sentence)."""
    if isinstance(err, WriteError) or not err.strerror:
        return str(err)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {err.strerror}" if paths else err.strerror


def os_error_in(exc: BaseException | None) -> OSError | None:
    """``exc`` if it is an ``OSError``, else the first one in its chain of causes and contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", durable: bool = True, **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.

    ``durable`` syncs the data to disk before the rename (a power cut cannot leave an empty file under the
    final name); many small files that can be made again (aligned crops) skip it: a killed process still
    leaves either the whole file or none, and fsync per file costs ~20x the write itself.

    A failure of the file system (creating the folder or the temporary file, writing, syncing, renaming)
    raises :class:`WriteError` naming ``path``; an ``OSError`` about another file (one the caller reads
    inside the block) passes through unchanged. Several files that must appear together (a RecordIO's
    ``.rec`` and ``.idx``) are several of these in one ``contextlib.ExitStack``."""
    path = Path(path)
    try:
        _make_parent(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _creation_error(path, err) from err
    with _replacing(Path(tmp), path):
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; others on a cluster must read results
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())


def write_json(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (:func:`atomic_write`): a reader sees the old file or the
    whole new one. Returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh, unused name beside ``path`` (:func:`temp_path`) for a file the block makes itself (a hard
    link, a copy); when the block ends, that file replaces ``path``. Errors as :func:`atomic_write`: the
    temporary file is removed, a failure of the file system is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        _make_parent(path)
    except OSError as err:
        raise _creation_error(path, err) from err
    tmp = temp_path(path)
    with _replacing(tmp, path):
        yield tmp


@contextmanager
def _replacing(tmp: Path, path: Path) -> Iterator[None]:
    """The commit both writers share: rename ``tmp`` over ``path`` once the block is done; on any error
    remove ``tmp`` and word a failure of the file system (no file named, or ``tmp`` or ``path``) as a
    :class:`WriteError`."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        cause = os_error_in(exc) if isinstance(exc, Exception) else None
        # the write itself failed (no file named, or ours), not a read of another file in the block
        ours = cause is not None and cause.errno is not None and cause.filename in (None, str(tmp), str(path))
        if ours and not isinstance(exc, WriteError):
            raise WriteError(path, cause) from exc
        raise


def _make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


def _creation_error(path: Path, err: OSError) -> WriteError:
    """The :class:`WriteError` for a temporary file that could not be made beside ``path``."""
    blocker = _file_among_parents(path.parent)
    return WriteError(path, err, f"{blocker} is a file, not a folder" if blocker else "")


def _file_among_parents(folder: Path) -> Path | None:
    """The first of ``folder`` and its parents that exists and is not a folder (it blocks ``mkdir``)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh name beside ``path`` in the atomic writer's pattern, for writers that must create the
    temporary file themselves (a hard link)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left directly in ``folder`` (names matching
    :data:`TEMP_FILE`; not in subfolders); returns them. Call it only where no write into ``folder`` can be
    under way, e.g. when a run starts, on the one process that writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if TEMP_FILE.fullmatch(p.name) and not p.is_dir())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
