"""MXNet / InsightFace RecordIO (``.rec`` + ``.idx`` + ``.lst``): reader, writer and folder packer.

Implemented with ``struct`` and ``mmap`` only; MXNet is not needed to read or write these files, and the
files written here are byte-for-byte what MXNet's ``MXIndexedRecordIO`` writes for the same payloads.

Format (dmlc-core ``recordio``):

* ``.idx`` is text, one ``key<TAB>byte_offset`` line per record.
* ``.rec`` is a sequence of parts: ``uint32`` magic ``0xced7230a``, ``uint32 lrec`` (low 29 bits: part
  length, top 3 bits: continuation flag), the part's bytes, zero padding to a multiple of 4. A record is
  one part with flag 0, or, when its payload contains the magic number at a 4-byte-aligned position, the
  writer cuts the payload at each such magic (dropping it) and writes parts flagged 1 (first),
  2 (middle), 3 (last); a reader joins the parts and puts the magic back between them.
* An image record's payload is a 24-byte header ``<IfQQ`` (``flag``, ``label``, ``id``, ``id2``); when
  ``flag > 0``, ``flag`` float32 labels follow the header and replace the scalar ``label``; the rest is
  the encoded image.

InsightFace training sets add a layout on top (:class:`RecordIOFaceSet`): record 0 is a meta header
whose labels are ``[image_end, identity_end]``; keys ``1 .. image_end-1`` are images labelled with their
class id; keys ``image_end .. identity_end-1`` hold one record per class whose labels are the
``[first, end)`` keys of its images. A rec made by ``im2rec`` has no header (record 0 has ``flag == 0``
or no record 0 exists): every key of the ``.idx`` is an image.

Command line::

    python -m data.recordio info PATH.rec            # one JSON object describing the file
    python -m data.recordio check PATH.rec           # decode every record, list every problem
    python -m data.recordio pack IMAGE_FOLDER OUT    # OUT.rec, OUT.idx, OUT.lst from <id>/<img> folders

``info`` reads the index, the meta header, the identity records and the 8-byte part header of every
record (magic number, length within the file), so a damaged record anywhere is an error, not a healthy
summary. ``check`` reads everything: every image is decoded and its size checked, every label is compared
with the identity table; it reports all problems, one line each, and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import math
import mmap
import multiprocessing
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from core.cli import run_json_command
from data.image_folder import FolderLayoutError as FolderLayoutError  # the packer's folder errors
from data.image_folder import ImageFolderFaces

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_PART_LEN = (1 << 29) - 1  # dmlc refuses records of 2**29 bytes or more
_PART_HEAD = struct.Struct("<II")
_IR_HEAD = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEAD.size  # 24
# Continuation flags of a part (top 3 bits of lrec).
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

JPEG_SOI = b"\xff\xd8\xff"


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair is malformed; the message names the file, the key/offset and the fault."""


class RecordLabelError(RecordIOError):
    """A record's label cannot be used as a class id (not a finite, non-negative integer value)."""


# --------------------------------------------------------------------------------------------------
# Image record header
# --------------------------------------------------------------------------------------------------


class IRHeader(NamedTuple):
    """The image-record header: ``label`` is a float when ``flag == 0``, else a tuple of ``flag`` floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def labels(self) -> tuple[float, ...]:
        """The labels as a tuple, whatever the flag (one element for a scalar label)."""
        return self.label if isinstance(self.label, tuple) else (self.label,)


def pack(label: float | Sequence[float], data: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Build an image-record payload; a sequence label is stored as ``flag = len(label)`` extra floats.

    Like MXNet's ``recordio.pack``, the scalar label field is written as 0 when a label array is given.
    """
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR_HEAD.pack(0, float(label), id, id2) + data
    labels = np.asarray(label, dtype="<f4").ravel()
    if labels.size == 0:
        raise ValueError("a label array must hold at least one value")
    return _IR_HEAD.pack(labels.size, 0.0, id, id2) + labels.tobytes() + data


def unpack(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split an image-record payload into its header and the image bytes; ``where`` prefixes errors."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(
            f"{where}: payload of {len(payload)} bytes is shorter than the {IR_HEADER_SIZE}-byte image header"
        )
    flag, label, id_, id2 = _IR_HEAD.unpack_from(payload)
    if flag == 0:
        return IRHeader(0, label, id_, id2), payload[IR_HEADER_SIZE:]
    end = IR_HEADER_SIZE + 4 * flag
    if len(payload) < end:
        raise RecordIOError(
            f"{where}: header flag {flag} announces {flag} labels ({end} bytes with the header) "
            f"but the payload has only {len(payload)} bytes"
        )
    labels = tuple(float(v) for v in np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER_SIZE))
    return IRHeader(flag, labels, id_, id2), payload[end:]


def class_id(value: float, where: str) -> int:
    """``value`` as an ``int`` class id; :class:`RecordLabelError` unless it is a finite integer >= 0."""
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise RecordLabelError(f"{where}: label {value!r} is not a non-negative integer class id")
    return int(value)


# --------------------------------------------------------------------------------------------------
# .idx files
# --------------------------------------------------------------------------------------------------


def read_index(idx_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys and byte offsets of an ``.idx`` file, in file order, as two ``int64`` arrays.

    Blank lines are ignored; any other line must be ``key<TAB>offset`` with integers and offset >= 0.
    """
    idx_path = Path(idx_path)
    text = idx_path.read_bytes()
    if not text.strip():
        raise RecordIOError(f"{idx_path}: index file is empty")
    try:
        # Fast C parser (about 0.5 s for MS1MV2's 5.8M lines); any complaint -> the careful parser below.
        table = np.loadtxt(io.BytesIO(text), dtype=np.int64, delimiter="\t", comments=None, ndmin=2)
        if table.shape[1] != 2 or (table[:, 1] < 0).any():
            raise ValueError("not two columns of offsets")
    except ValueError:
        keys, offsets, _ = _parse_index_lines(text, idx_path)
        return keys, offsets
    return np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1])


def _parse_index_lines(text: bytes, idx_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line-by-line ``.idx`` parser that names the first bad line; also returns 1-based line numbers."""
    keys, offsets, lines = [], [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise RecordIOError(
                f"{idx_path}: line {lineno}: expected 'key<TAB>offset', "
                f"got {raw[:80]!r} ({len(fields)} fields)"
            )
        try:
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(
                f"{idx_path}: line {lineno}: key and offset must be integers, got {raw[:80]!r}"
            ) from None
        if offset < 0:
            raise RecordIOError(f"{idx_path}: line {lineno}: key {key} has negative offset {offset}")
        keys.append(key)
        offsets.append(offset)
        lines.append(lineno)
    return np.asarray(keys, np.int64), np.asarray(offsets, np.int64), np.asarray(lines, np.int64)


def _line_of(idx_path: Path, entry: int) -> int:
    """1-based line number of the ``entry``-th record line of an ``.idx`` (only used to word errors)."""
    return int(_parse_index_lines(idx_path.read_bytes(), idx_path)[2][entry])


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


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
        return np.flatnonzero((self._offsets + _PART_HEAD.size > self.size) | (self._offsets % 4 != 0))

    def _offset_fault(self, i: int) -> str:
        key, offset = int(self._keys[i]), int(self._offsets[i])
        fault = (
            f"is past the end of {self.rec_path} ({self.size} bytes)"
            if offset + _PART_HEAD.size > self.size
            else "is not a multiple of 4 (records are 4-byte aligned)"
        )
        return f"{self.idx_path}: line {_line_of(self.idx_path, i)}: key {key}: offset {offset} {fault}"

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
        start = offsets + _PART_HEAD.size
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
            lines = [_line_of(self.idx_path, int(i)) for i in np.flatnonzero(self._keys == key)]
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
        if pos + _PART_HEAD.size > len(mm):
            raise RecordIOError(
                f"{where}: truncated record: the part header at offset {pos} runs past the end of the file "
                f"({len(mm)} bytes)"
            )
        magic, lrec = _PART_HEAD.unpack_from(mm, pos)
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
        start = pos + _PART_HEAD.size
        if start + length > len(mm):
            raise RecordIOError(
                f"{where}: truncated record: the part at offset {pos} declares {length} bytes but the file "
                f"ends {len(mm) - start} bytes after its header ({len(mm)} bytes in all)"
            )
        return flag, start, length


# --------------------------------------------------------------------------------------------------
# Face-set layout
# --------------------------------------------------------------------------------------------------


class RecordIOFaceSet:
    """The images of an InsightFace ``train.rec`` (or a header-less ``im2rec`` rec), by position.

    Position ``i`` in ``0 .. num_images-1`` is key ``i+1`` when record 0 is a meta header, otherwise the
    ``i``-th key of the ``.idx``. ``self[i]`` is ``(encoded image bytes, int class id)``; decoding is
    left to the caller. Pickling carries the index arrays, never the mmap (see :class:`IndexedRecordIO`).
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str] | None = None,
        check_offsets: bool = True,
        records: IndexedRecordIO | None = None,
    ):
        """``records``: the already opened reader of ``rec_path`` (its index is not parsed again)."""
        self.records = records if records is not None else IndexedRecordIO(rec_path, idx_path, check_offsets)
        self.rec_path = self.records.rec_path
        self.has_header = False
        self._identity_keys: np.ndarray | None = None
        self._image_keys = self._read_layout()
        try:
            self._image_offsets = self.records.offsets_of(self._image_keys)
        except KeyError as err:
            raise RecordIOError(
                f"{self.rec_path}: the meta header (record 0) lists image keys 1..{len(self._image_keys)} "
                f"but {err.args[0]}"
            ) from None
        self._labels: np.ndarray | None = None
        self._ranges: np.ndarray | None = None

    def _read_layout(self) -> np.ndarray:
        """Image keys; sets ``has_header`` and the identity-record keys when record 0 is a meta header."""
        if 0 not in self.records:
            return self.records.keys
        where = f"{self.rec_path}: key 0 (meta header)"
        head = self.records.read_at(self.records.offset(0), 0, limit=IR_HEADER_SIZE + 8)
        header, _ = unpack(head, where)
        if header.flag == 0:
            return self.records.keys
        if header.flag < 2:
            raise RecordIOError(f"{where}: flag {header.flag}, but a meta header needs 2 labels")
        image_end, identity_end = (class_id(v, where) for v in header.labels[:2])
        if not 1 <= image_end <= identity_end:
            raise RecordIOError(
                f"{where}: labels [{image_end}, {identity_end}] must satisfy 1 <= image_end <= identity_end"
            )
        self.has_header = True
        self._identity_keys = np.arange(image_end, identity_end, dtype=np.int64)
        return np.arange(1, image_end, dtype=np.int64)

    # -- sizes --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._image_keys)

    @property
    def num_images(self) -> int:
        return len(self._image_keys)

    @property
    def num_identities(self) -> int:
        """Identity records in the header layout; distinct labels otherwise (reads every label)."""
        if self._identity_keys is not None:
            return len(self._identity_keys)
        return len(np.unique(self.labels()))

    # -- one image ----------------------------------------------------------------------------------

    def key(self, i: int) -> int:
        """Record key of position ``i``."""
        return int(self._image_keys[self._check_index(i)])

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self._image_keys):
            raise IndexError(
                f"{self.rec_path}: image position {i} out of range 0..{len(self._image_keys) - 1}"
            )
        return i

    def _header(self, i: int, limit: int | None) -> tuple[IRHeader, bytes, str]:
        i = self._check_index(i)
        key = int(self._image_keys[i])
        where = f"{self.rec_path}: key {key}"
        payload = self.records.read_at(int(self._image_offsets[i]), key, limit=limit)
        if limit is not None and len(payload) >= IR_HEADER_SIZE:
            flag = _IR_HEAD.unpack_from(payload)[0]
            if len(payload) < IR_HEADER_SIZE + 4 * flag:  # multi-label: read the labels too
                payload = self.records.read_at(int(self._image_offsets[i]), key, IR_HEADER_SIZE + 4 * flag)
        header, image = unpack(payload, where)
        return header, image, where

    def label(self, i: int) -> int:
        """Class id of position ``i`` (the first label of a multi-label record); reads only the header."""
        header, _, where = self._header(i, limit=IR_HEADER_SIZE)
        return class_id(header.labels[0], where)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of position ``i``."""
        return self._header(i, limit=None)[1]

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        header, image, where = self._header(i, limit=None)
        return image, class_id(header.labels[0], where)

    def header(self, i: int) -> IRHeader:
        """The full image-record header of position ``i`` (all labels, ids)."""
        return self._header(i, limit=None)[0]

    # -- identities ---------------------------------------------------------------------------------

    def labels(self) -> np.ndarray:
        """Class id of every image (``int64``); reads every record header once, then cached."""
        if self._labels is None:
            self._labels = np.fromiter((self.label(i) for i in range(len(self))), np.int64, len(self))
        return self._labels

    @property
    def identity_ranges(self) -> np.ndarray:
        """``(C, 2)`` ``int64`` array: row ``c`` is the ``[first, end)`` keys of class ``c``'s images.

        In the header layout this comes from the identity records (row ``c`` from key ``image_end + c``).
        Without a header, rows follow the sorted distinct labels and need each label's images to be a
        run of consecutive keys; :class:`RecordIOError` says which label is not (see
        :meth:`indices_per_identity`, which always works).
        """
        if self._ranges is None:
            self._ranges = self._header_ranges() if self.has_header else self._grouped_ranges()
        view = self._ranges.view()
        view.flags.writeable = False
        return view

    def _header_ranges(self) -> np.ndarray:
        assert self._identity_keys is not None
        ranges = np.empty((len(self._identity_keys), 2), np.int64)
        for row, key in enumerate(self._identity_keys.tolist()):
            ranges[row] = self._identity_range(row, key)
        return ranges

    def _identity_range(self, row: int, key: int) -> tuple[int, int]:
        """``[first, end)`` of identity record ``key`` (class ``row``); :class:`RecordIOError` if unusable."""
        image_end = len(self._image_keys) + 1
        where = f"{self.rec_path}: key {key} (identity record of class {row})"
        try:
            offset = self.records.offset(key)
        except KeyError as err:
            raise RecordIOError(f"{where}: listed by the meta header but {err.args[0]}") from None
        header, _ = unpack(self.records.read_at(offset, key, limit=IR_HEADER_SIZE + 8), where)
        if header.flag < 2:
            raise RecordIOError(f"{where}: flag {header.flag}, but an identity record needs 2 labels")
        first, end = (class_id(v, where) for v in header.labels[:2])
        if not 1 <= first <= end <= image_end:
            raise RecordIOError(
                f"{where}: range [{first}, {end}) is not within the image keys [1, {image_end})"
            )
        return first, end

    def identity_problems(self, labels: np.ndarray | None = None) -> list[str]:
        """Every way the identity table disagrees with itself or with the images, one line each.

        With a meta header: every identity record it announces must be in the index and readable, and their
        ``[first, end)`` ranges must tile the image keys in class order (no class without images, no key in
        two classes or in none); with ``labels`` (the class id of every image position, ``-1`` for one that
        could not be read), every image's label must be the class whose range holds its key. Without a
        header the classes are the distinct labels, which must be ``0 .. C-1`` (read with :meth:`labels`
        when ``labels`` is None). An empty list means the table can be trusted.
        """
        if not self.has_header:
            return self._label_set_problems(self.labels() if labels is None else labels)
        assert self._identity_keys is not None
        keys = self._identity_keys
        image_end = len(self._image_keys) + 1
        if len(keys) == 0:
            return [
                f"{self.rec_path}: key 0 (meta header) announces no identities for its {len(self)} images"
            ]
        problems = []
        present = np.isin(keys, self.records.keys)
        if not present.all():
            missing = keys[~present]
            shown = ", ".join(str(k) for k in missing[:5].tolist()) + (", ..." if missing.size > 5 else "")
            problems.append(
                f"{self.rec_path}: key 0 (meta header) announces {len(keys)} identities (keys {keys[0]}.."
                f"{keys[-1]}), but {missing.size} of their records are not in the index (keys {shown})"
            )
        firsts, ends = np.full(len(keys), -1, np.int64), np.full(len(keys), -1, np.int64)
        expected = 1  # where the next class's range must start
        for row, key in enumerate(keys.tolist()):
            if not present[row]:
                continue
            try:
                first, end = self._identity_range(row, key)
            except RecordIOError as err:
                problems.append(str(err))
                continue
            where = f"{self.rec_path}: key {key} (identity record of class {row})"
            if first == end:
                problems.append(f"{where}: empty range [{first}, {end}): a class without images")
            elif first != expected:
                problems.append(
                    f"{where}: range [{first}, {end}) should start at key {expected}, where the previous "
                    "class's range ends (ranges tile the image keys in class order)"
                )
            firsts[row], ends[row], expected = first, end, end
        if len(keys) and ends[-1] >= 0 and expected != image_end:
            problems.append(
                f"{self.rec_path}: the identity records cover image keys 1..{expected - 1}, the meta header "
                f"announces images up to key {image_end - 1}"
            )
        if labels is not None:
            problems += self._label_range_problems(np.asarray(labels, np.int64), firsts, ends)
        return problems

    def _label_range_problems(self, labels: np.ndarray, firsts: np.ndarray, ends: np.ndarray) -> list[str]:
        """Images whose label is not the class whose identity record's range holds their key."""
        image_keys, keys = self._image_keys, self._identity_keys
        assert keys is not None
        holder = np.full(len(image_keys), -1, np.int64)  # class whose range holds each image key
        for row in np.flatnonzero(firsts >= 0).tolist():
            holder[firsts[row] - 1 : ends[row] - 1] = row  # image key k is position k - 1
        problems = []
        for i in np.flatnonzero((labels >= 0) & (labels != holder)).tolist():
            key, label, row = int(image_keys[i]), int(labels[i]), int(holder[i])
            if row < 0:
                problems.append(f"{self.rec_path}: key {key}: label {label}, but no identity record holds it")
            else:
                problems.append(
                    f"{self.rec_path}: key {key}: label {label}, but it lies in [{firsts[row]}, "
                    f"{ends[row]}), the range of class {row} (identity record key {int(keys[row])})"
                )
        return problems

    def _label_set_problems(self, labels: np.ndarray) -> list[str]:
        """Header-less: the distinct labels must be ``0 .. C-1``; names the first key of each label past."""
        labels = np.asarray(labels, np.int64)
        found = np.unique(labels[labels >= 0])
        count = len(found)
        problems = []
        for label in found[found >= count].tolist():
            key = int(self._image_keys[int(np.flatnonzero(labels == label)[0])])
            problems.append(
                f"{self.rec_path}: key {key}: label {label}, but the file has no header and {count} distinct "
                f"labels, so class ids must be 0..{count - 1}"
            )
        return problems

    def _grouped_ranges(self) -> np.ndarray:
        groups = self.indices_per_identity()
        ranges = np.empty((len(groups), 2), np.int64)
        for row, (label, positions) in enumerate(groups.items()):
            keys = self._image_keys[positions]
            if np.any(np.diff(keys) != 1):
                raise RecordIOError(
                    f"{self.rec_path}: no header, and the images of label {label} are not consecutive keys "
                    f"(keys {keys[:6].tolist()}...); use indices_per_identity()"
                )
            ranges[row] = keys[0], keys[-1] + 1
        return ranges

    def indices_per_identity(self) -> dict[int, np.ndarray]:
        """Image positions of each class id (sorted ids; positions ascending), from the labels."""
        labels = self.labels()
        order = np.argsort(labels, kind="stable")
        ids, starts = np.unique(labels[order], return_index=True)
        return {int(c): positions for c, positions in zip(ids, np.split(order, starts[1:]), strict=True)}

    def close(self) -> None:
        self.records.close()

    def __repr__(self) -> str:
        return f"RecordIOFaceSet({str(self.rec_path)!r}, images={self.num_images}, header={self.has_header})"


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class RecordIOWriter:
    """Write a ``.rec``/``.idx`` pair the way MXNet's ``MXIndexedRecordIO`` does, atomically.

    Records go to temporary files beside the targets, which replace them only at :meth:`close`
    (``.rec`` first, then ``.idx``); leaving a ``with`` block on an exception removes the temporary
    files and leaves any existing targets untouched. Payloads holding the magic number at an aligned
    position are split into continuation parts exactly as dmlc-core does.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._rec, self._rec_tmp = _temp_beside(self.rec_path)
        self._idx, self._idx_tmp = _temp_beside(self.idx_path)
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
            self._rec.write(_PART_HEAD.pack(MAGIC, (flag << 29) | len(part)) + part + pad)
            self._pos += _PART_HEAD.size + len(part) + len(pad)
        self._idx.write(f"{key}\t{offset}\n".encode())
        self._keys.add(key)
        return offset

    def close(self) -> None:
        """Flush, fsync and move both files into place."""
        if not self._open:
            return
        for fh in (self._rec, self._idx):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._open = False

    def abort(self) -> None:
        """Drop everything written; existing target files are left as they were."""
        if not self._open:
            return
        for fh, tmp in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            fh.close()
            tmp.unlink(missing_ok=True)
        self._open = False

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _temp_beside(path: Path) -> tuple[IO[bytes], Path]:
    """A new temporary file in ``path``'s folder, created with the usual umask-governed permissions.

    (``tempfile.mkstemp`` would make it owner-only, and a dataset should stay readable by the group.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), tmp


def _split_parts(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """dmlc-core's cut: at every 4-byte-aligned magic number, end a part and drop the magic."""
    start, search = 0, 0
    while (hit := payload.find(MAGIC_BYTES, search)) != -1:
        if hit % 4 == 0:
            yield (FIRST if start == 0 else MIDDLE), payload[start:hit]
            start = hit + 4
        search = hit + 1
    yield (WHOLE if start == 0 else LAST), payload[start:]


# --------------------------------------------------------------------------------------------------
# Packing an image folder
# --------------------------------------------------------------------------------------------------


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
        lst, lst_tmp = _temp_beside(lst_path)
        try:
            with lst:
                lst.write("".join(lst_lines).encode())
            os.replace(lst_tmp, lst_path)
        finally:
            lst_tmp.unlink(missing_ok=True)
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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def find_recordio(root: str | os.PathLike[str]) -> Path | None:
    """The ``.rec`` that ``root`` names: the file itself, the prefix ``root.rec``, or ``root/train.rec``."""
    root = Path(root)
    for candidate in (root, root.with_name(root.name + ".rec"), root / "train.rec"):
        if candidate.suffix == ".rec" and candidate.is_file():
            return candidate
    return None


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


def _check_command(args: argparse.Namespace) -> int:
    """``check``: each problem on stderr as it is found, the JSON summary on stdout, then one closing line."""
    found: list[str] = []

    def show(problem: str) -> None:
        found.append(problem)
        print(problem, file=sys.stderr, flush=True)

    try:
        summary = check(args.path, args.idx, args.image_size or None, args.workers, args.allow_empty, show)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if found:
        print(f"error: {summary['path']}: {len(found)} problems; the first: {found[0]}", file=sys.stderr)
        return 1
    return 0


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """``info PATH``, ``check PATH`` or ``pack IMAGE_FOLDER OUT_PREFIX``."""
    parser = argparse.ArgumentParser(prog="python -m data.recordio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="describe a .rec/.idx pair (checks every record's header)")
    p_info.add_argument("rec", type=Path, help=".rec file, its prefix, or a folder holding train.rec")
    p_info.add_argument("--idx", type=Path, default=None, help="index file (default: beside the .rec)")
    p_check = sub.add_parser("check", help="decode every record and list every problem (exit 1 if any)")
    p_check.add_argument(
        "path", type=Path, help=".rec file, its prefix, a folder holding train.rec, or an image folder"
    )
    p_check.add_argument("--idx", type=Path, default=None, help="index file (default: beside the .rec)")
    p_check.add_argument(
        "--workers", type=_at_least(1), default=min(8, os.cpu_count() or 1), help="processes"
    )
    p_check.add_argument(
        "--image-size", type=_at_least(0), default=112, help="side of the stored faces (0: any size)"
    )
    p_check.add_argument("--allow-empty", action="store_true", help="skip identity folders without images")
    p_pack = sub.add_parser("pack", help="pack <root>/<identity>/<image> into OUT.rec/.idx/.lst")
    p_pack.add_argument("folder", type=Path)
    p_pack.add_argument("out_prefix", type=Path)
    p_pack.add_argument(
        "--quality", type=_at_least(1), default=95, help="JPEG quality (1-100) for re-encoded images"
    )
    p_pack.add_argument("--image-size", type=_at_least(1), default=112, help="side of the aligned faces")
    p_pack.add_argument("--resize", action="store_true", help="scale square images of another size")
    p_pack.add_argument("--allow-empty", action="store_true", help="skip identity folders without images")
    p_pack.add_argument("--overwrite", action="store_true", help="replace an existing OUT.rec/.idx/.lst")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of :func:`build_parser`; prints JSON."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return run_json_command(lambda: info(args.rec, args.idx))
    if args.command == "check":
        return _check_command(args)
    if args.quality > 100:
        print(f"error: --quality {args.quality}: JPEG quality is 1 to 100", file=sys.stderr)
        return 1
    return run_json_command(
        lambda: pack_folder(
            args.folder,
            args.out_prefix,
            args.quality,
            args.image_size,
            args.resize,
            args.allow_empty,
            overwrite=args.overwrite,
            skip_hint="--allow-empty",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
