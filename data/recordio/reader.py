"""Random access to the records of a ``.rec`` through its ``.idx`` (:class:`IndexedRecordIO`), and where a
command's ``.rec`` is (:func:`find_recordio`)."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from data.recordio.format import (
    FIRST,
    LAST,
    MAGIC,
    MAGIC_BYTES,
    MAX_PART_LEN,
    MIDDLE,
    PART_HEAD,
    WHOLE,
    RecordIOError,
)
from data.recordio.index import line_of, read_index


class IndexedRecordIO:
    """Random access to the records of a ``.rec`` file through its ``.idx``, over a read-only mmap.

    The mmap is opened lazily in each process (and reopened after a fork), and it is not pickled, so
    the reader can be handed to DataLoader workers. Keys are kept in ``.idx`` order in numpy arrays,
    which forked workers share without copying.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str] | None = None,
        check_offsets: bool = True,
    ):
        """``check_offsets=False`` leaves offsets past the end or not 4-byte aligned to :meth:`scan`, which
        reports every one (the default refuses the index at the first)."""
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if self.rec_path.is_dir():
            raise RecordIOError(f"{self.rec_path} is a folder, not a record file")
        if not self.rec_path.is_file():
            raise FileNotFoundError(
                errno.ENOENT, f"record file {self.rec_path} does not exist", str(self.rec_path)
            )
        if not self.idx_path.is_file():
            raise FileNotFoundError(
                errno.ENOENT,
                f"index file {self.idx_path} is missing; it is needed to read {self.rec_path}",
                str(self.idx_path),
            )
        self.size = self.rec_path.stat().st_size
        if self.size == 0:
            raise RecordIOError(f"{self.rec_path}: record file is empty")
        self._keys, self._offsets = read_index(self.idx_path)
        if check_offsets:
            self._check_offsets()
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted_keys = self._keys[self._order]
        self._check_unique_keys()
        self._mm: mmap.mmap | None = None
        self._file: IO[bytes] | None = None
        self._pid: int | None = None

    # -- construction checks ------------------------------------------------------------------------

    def _bad_offsets(self) -> np.ndarray:
        """Rows of the ``.idx`` whose offset leaves no room for a part header or is not 4-byte aligned."""
        return np.flatnonzero((self._offsets + PART_HEAD.size > self.size) | (self._offsets % 4 != 0))

    def _offset_fault(self, i: int) -> str:
        key, offset = int(self._keys[i]), int(self._offsets[i])
        fault = (
            f"is past the end of {self.rec_path} ({self.size} bytes)"
            if offset + PART_HEAD.size > self.size
            else "is not a multiple of 4 (records are 4-byte aligned)"
        )
        return f"{self.idx_path}: line {line_of(self.idx_path, i)}: key {key}: offset {offset} {fault}"

    def _check_offsets(self) -> None:
        bad = self._bad_offsets()
        if bad.size:
            raise RecordIOError(self._offset_fault(int(bad[0])))

    def scan(self) -> list[tuple[int, str]]:
        """``(key, problem)`` for every record of the index that cannot be read, in ``.idx`` order.

        Every entry's 8-byte part header is read (one vectorised gather, not the payloads): the offset must
        leave room for it and be 4-byte aligned, the magic number must be there, the part must be a record's
        first, and its length must stay within the file and end before the next record begins. Multi-part
        records are followed to their last part. The wording is that of :meth:`read`.
        """
        problems: dict[int, str] = {int(i): self._offset_fault(int(i)) for i in self._bad_offsets()}
        rows = np.setdiff1d(np.arange(len(self._keys)), np.fromiter(problems, np.int64, len(problems)))
        offsets = self._offsets[rows]
        words = np.frombuffer(self._map(), dtype="<u4", count=self.size // 4)
        try:  # fancy indexing copies, so no view of the mmap outlives this block (close() needs that)
            magic, lrec = words[offsets // 4], words[offsets // 4 + 1]
        finally:
            del words
        flag, length = lrec >> 29, (lrec & MAX_PART_LEN).astype(np.int64)
        start = offsets + PART_HEAD.size
        suspect = (magic != MAGIC) | (flag > FIRST) | (start + length > self.size) | (flag == FIRST)
        for row in rows[suspect].tolist():
            try:
                self.read_at(int(self._offsets[row]), int(self._keys[row]))
            except RecordIOError as err:
                problems[row] = str(err)
        # A whole record ends (padded to 4 bytes) at or before the next record's offset.
        whole = ~suspect
        order = np.argsort(offsets, kind="stable")
        ends = (start + ((length + 3) & ~3))[order]
        next_offsets = np.append(offsets[order][1:], self.size)
        for j in np.flatnonzero(whole[order] & (ends > next_offsets)).tolist():
            row, following = int(rows[order[j]]), rows[order[j + 1]] if j + 1 < len(order) else None
            into = (
                f"the start of key {int(self._keys[following])} at offset {int(next_offsets[j])}"
                if following is not None
                else f"the end of the file ({self.size} bytes)"
            )
            problems[row] = (
                f"{self.rec_path}: key {int(self._keys[row])} at offset {int(self._offsets[row])}: its part "
                f"length {int(length[order[j]])} runs past {into}"
            )
        return [(int(self._keys[row]), problems[row]) for row in sorted(problems)]

    def _check_unique_keys(self) -> None:
        dup = np.flatnonzero(np.diff(self._sorted_keys) == 0)
        if dup.size:
            key = int(self._sorted_keys[dup[0]])
            lines = [line_of(self.idx_path, int(i)) for i in np.flatnonzero(self._keys == key)]
            raise RecordIOError(f"{self.idx_path}: key {key} appears more than once (lines {lines})")

    # -- process-local mmap -------------------------------------------------------------------------

    def _map(self) -> mmap.mmap:
        """The mmap of this process, opened on first use and again in a forked child."""
        if self._mm is None or self._pid != os.getpid():
            # A child inherits the parent's mapping object; leave it to the parent and map afresh.
            self._mm, self._file = None, None
            self._file = open(self.rec_path, "rb")  # noqa: SIM115 - lives as long as the mapping
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._pid = os.getpid()
        return self._mm

    def close(self) -> None:
        """Release the mmap (it is reopened if the reader is used again)."""
        if self._mm is not None and self._pid == os.getpid():
            self._mm.close()
            assert self._file is not None
            self._file.close()
        self._mm, self._file, self._pid = None, None, None

    def __enter__(self) -> IndexedRecordIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_mm=None, _file=None, _pid=None)
        return state

    # -- keys ---------------------------------------------------------------------------------------

    @property
    def keys(self) -> np.ndarray:
        """All keys in ``.idx`` order (read-only ``int64`` array)."""
        view = self._keys.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        try:
            self._positions(np.asarray([key], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Row in ``.idx`` order of each key; ``KeyError`` naming the first key the index lacks."""
        where = np.searchsorted(self._sorted_keys, keys)
        where = np.minimum(where, len(self._sorted_keys) - 1)
        missing = np.flatnonzero(self._sorted_keys[where] != keys)
        if missing.size:
            raise KeyError(f"{self.idx_path}: no key {int(keys[missing[0]])} in the index")
        return self._order[where]

    def offsets_of(self, keys: np.ndarray | Sequence[int]) -> np.ndarray:
        """Byte offsets of ``keys`` (vectorised); ``KeyError`` for a key the index lacks."""
        return self._offsets[self._positions(np.asarray(keys, dtype=np.int64))]

    def offset(self, key: int) -> int:
        """Byte offset of the record ``key``."""
        return int(self.offsets_of([key])[0])

    # -- records ------------------------------------------------------------------------------------

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (parts of a multi-part record joined)."""
        return self.read_at(self.offset(key), key)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """``(key, payload)`` for every record, in ``.idx`` order."""
        for key, offset in zip(self._keys.tolist(), self._offsets.tolist(), strict=True):
            yield key, self.read_at(offset, key)

    def read_at(self, offset: int, key: int | None = None, limit: int | None = None) -> bytes:
        """The payload of the record starting at ``offset``; ``key`` is only used in error messages.

        With ``limit``, at most that many leading bytes are returned, which avoids copying the image
        when only the header is wanted.
        """
        mm = self._map()
        pos, parts, first = offset, [], True
        while True:
            flag, start, length = self._part(mm, pos, offset, key, first)
            if flag == WHOLE or (first and limit is not None and length >= limit):
                return mm[start : start + (length if limit is None else min(length, limit))]
            parts.append(mm[start : start + length])
            if flag == LAST:
                return b"".join(parts)
            # The writer cut the payload at a magic number and dropped it; put it back.
            parts.append(MAGIC_BYTES)
            pos, first = start + ((length + 3) & ~3), False

    def _part(
        self, mm: mmap.mmap, pos: int, offset: int, key: int | None, first: bool
    ) -> tuple[int, int, int]:
        """Check and decode the part header at ``pos``: ``(flag, payload start, payload length)``."""
        where = f"{self.rec_path}: key {key} at offset {offset}" if key is not None else f"{self.rec_path}"
        if pos + PART_HEAD.size > len(mm):
            raise RecordIOError(
                f"{where}: truncated record: the part header at offset {pos} runs past the end of the file "
                f"({len(mm)} bytes)"
            )
        magic, lrec = PART_HEAD.unpack_from(mm, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{where}: bad magic number 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x}); "
                "the .rec is corrupt or the .idx does not belong to it"
            )
        flag, length = lrec >> 29, lrec & MAX_PART_LEN
        if first and flag not in (WHOLE, FIRST):
            raise RecordIOError(
                f"{where}: the offset points into the middle of a multi-part record "
                f"(continuation flag {flag})"
            )
        if not first and flag not in (MIDDLE, LAST):
            raise RecordIOError(
                f"{where}: multi-part record broken at offset {pos}: "
                f"continuation flag {flag}, expected 2 or 3"
            )
        start = pos + PART_HEAD.size
        if start + length > len(mm):
            raise RecordIOError(
                f"{where}: truncated record: the part at offset {pos} declares {length} bytes but the file "
                f"ends {len(mm) - start} bytes after its header ({len(mm)} bytes in all)"
            )
        return flag, start, length


def find_recordio(root: str | os.PathLike[str]) -> Path | None:
    """The ``.rec`` that ``root`` names: the file itself, the prefix ``root.rec``, or ``root/train.rec``."""
    root = Path(root)
    for candidate in (root, root.with_name(root.name + ".rec"), root / "train.rec"):
        if candidate.suffix == ".rec" and candidate.is_file():
            return candidate
    return None
