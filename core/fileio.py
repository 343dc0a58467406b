"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves the old one.

A write goes to ``.<name>.<8 random characters>.tmp`` beside its target and is renamed over it when complete.
A process killed mid-write leaves that temporary file behind (for an IResNet-100 checkpoint 1-2 GB);
:func:`remove_stale_temp_files` deletes those of a folder, and nothing else.
"""

from __future__ import annotations

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


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; others on a cluster must read results
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
