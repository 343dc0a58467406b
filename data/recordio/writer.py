"""Writing a ``.rec``/``.idx`` pair byte for byte as MXNet's ``MXIndexedRecordIO`` does, atomically."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from core.fileio import atomic_write
from data.recordio.format import FIRST, LAST, MAGIC, MAGIC_BYTES, MAX_PART_LEN, MIDDLE, PART_HEAD, WHOLE


class RecordIOWriter:
    """Write a ``.rec``/``.idx`` pair the way MXNet's ``MXIndexedRecordIO`` does, atomically.

    Records go to temporary files beside the targets (:func:`core.fileio.atomic_write`, one for each),
    which replace them only at :meth:`close` (``.rec`` first, then ``.idx``); leaving a ``with`` block on an
    exception removes the temporary files and leaves any existing targets untouched. Payloads holding the
    magic number at an aligned position are split into continuation parts exactly as dmlc-core does.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        # entered idx first: an ExitStack leaves in reverse order, so the .rec is in place before its .idx
        self._files = ExitStack()
        try:
            self._idx: IO[bytes] = self._files.enter_context(atomic_write(self.idx_path, "wb"))
            self._rec: IO[bytes] = self._files.enter_context(atomic_write(self.rec_path, "wb"))
        except BaseException as exc:
            self._files.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._keys: set[int] = set()
        self._pos = 0
        self._open = True

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under ``key``; returns its byte offset."""
        if not self._open:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        if len(payload) > MAX_PART_LEN:
            raise ValueError(f"{self.rec_path}: key {key}: {len(payload)} bytes, RecordIO allows < 2**29")
        offset = self._pos
        for flag, part in _split_parts(payload):
            pad = b"\0" * (-len(part) % 4)
            self._rec.write(PART_HEAD.pack(MAGIC, (flag << 29) | len(part)) + part + pad)
            self._pos += PART_HEAD.size + len(part) + len(pad)
        self._idx.write(f"{key}\t{offset}\n".encode())
        self._keys.add(key)
        return offset

    def close(self) -> None:
        """Flush, fsync and move both files into place."""
        self._finish(None)

    def abort(self) -> None:
        """Drop everything written; existing target files are left as they were."""
        self._finish(_Aborted())

    def _finish(self, exc: BaseException | None) -> None:
        """Commit both files (``exc`` None) or remove them; a failure of the file system while committing,
        or an ``exc`` that is one, is raised as :class:`core.fileio.WriteError` naming the file."""
        if not self._open:
            return
        self._open = False
        self._files.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._finish(exc)


class _Aborted(BaseException):
    """Thrown into the writer's temporary files to remove them (not an error: nothing reports it)."""


def _split_parts(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """dmlc-core's cut: at every 4-byte-aligned magic number, end a part and drop the magic."""
    start, search = 0, 0
    while (hit := payload.find(MAGIC_BYTES, search)) != -1:
        if hit % 4 == 0:
            yield (FIRST if start == 0 else MIDDLE), payload[start:hit]
            start = hit + 4
        search = hit + 1
    yield (WHOLE if start == 0 else LAST), payload[start:]
