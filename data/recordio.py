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
    python -m data.recordio pack IMAGE_FOLDER OUT    # OUT.rec, OUT.idx, OUT.lst from <id>/<img> folders
"""

from __future__ import annotations

import argparse
import errno
import io
import math
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from core.cli import run_json_command

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_PART_LEN = (1 << 29) - 1  # dmlc refuses records of 2**29 bytes or more
_PART_HEAD = struct.Struct("<II")
_IR_HEAD = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEAD.size  # 24
# Continuation flags of a part (top 3 bits of lrec).
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}
)
JPEG_SOI = b"\xff\xd8\xff"


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair is malformed; the message names the file, the key/offset and the fault."""


class RecordLabelError(RecordIOError):
    """A record's label cannot be used as a class id (not a finite, non-negative integer value)."""


class FolderLayoutError(ValueError):
    """An image folder does not have the ``<root>/<identity>/<image>`` layout :func:`pack_folder` needs."""


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

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
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
        self._check_offsets()
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted_keys = self._keys[self._order]
        self._check_unique_keys()
        self._mm: mmap.mmap | None = None
        self._file: IO[bytes] | None = None
        self._pid: int | None = None

    # -- construction checks ------------------------------------------------------------------------

    def _check_offsets(self) -> None:
        bad = np.flatnonzero((self._offsets + _PART_HEAD.size > self.size) | (self._offsets % 4 != 0))
        if bad.size:
            i = int(bad[0])
            key, offset = int(self._keys[i]), int(self._offsets[i])
            fault = (
                f"is past the end of {self.rec_path} ({self.size} bytes)"
                if offset + _PART_HEAD.size > self.size
                else "is not a multiple of 4 (records are 4-byte aligned)"
            )
            raise RecordIOError(
                f"{self.idx_path}: line {_line_of(self.idx_path, i)}: key {key}: offset {offset} {fault}"
            )

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

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None):
        self.records = IndexedRecordIO(rec_path, idx_path)
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
        image_end = len(self._image_keys) + 1
        ranges = np.empty((len(self._identity_keys), 2), np.int64)
        for row, key in enumerate(self._identity_keys.tolist()):
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
            ranges[row] = first, end
        return ranges

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
    folder: str | os.PathLike[str], out_prefix: str | os.PathLike[str], quality: int = 95
) -> dict[str, Any]:
    """Pack ``folder/<identity>/<image>`` into ``OUT.rec``, ``OUT.idx`` and ``OUT.lst`` (InsightFace layout).

    Identities are the sub-folders in sorted order, labelled ``0..C-1``; images are taken in sorted order
    within each. Record 0 is the meta header (``flag=2``, labels ``[N+1, N+1+C]``), keys ``1..N`` are the
    images (label = class id, ``id`` = key), keys ``N+1..N+C`` one record per identity with labels
    ``[first, end)``. Files that already are JPEG are stored as their bytes, unchanged; other images
    (PNG, BMP, PGM, ...) are decoded with OpenCV and re-encoded as 3-channel JPEG at ``quality`` (95).
    ``OUT.lst`` lists ``key<TAB>label<TAB>relative path`` in ``im2rec`` format. Files without an image
    suffix are not packed and are listed under ``ignored`` in the returned summary.
    """
    folder, out_prefix = Path(folder), Path(out_prefix)
    identities, ignored = _list_identities(folder)
    num_images = sum(len(files) for _, files in identities)
    rec_path = out_prefix.with_name(out_prefix.name + ".rec")
    idx_path = out_prefix.with_name(out_prefix.name + ".idx")
    lst_lines, reencoded = [], 0
    with RecordIOWriter(rec_path, idx_path) as writer:
        writer.write(0, pack([num_images + 1, num_images + 1 + len(identities)], b""))
        key, ranges = 1, []
        for label, (_, files) in enumerate(identities):
            ranges.append((key, key + len(files)))
            for path in files:
                data, was_jpeg = _jpeg_bytes(path, quality)
                reencoded += not was_jpeg
                writer.write(key, pack(float(label), data, id=key))
                lst_lines.append(f"{key}\t{float(label):f}\t{path.relative_to(folder).as_posix()}\n")
                key += 1
        for first, end in ranges:
            writer.write(key, pack([first, end], b"", id=key))
            key += 1
        lst_path = out_prefix.with_name(out_prefix.name + ".lst")
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
        "identities": len(identities),
        "reencoded": reencoded,
        "ignored": [str(p) for p in ignored],
    }


def _list_identities(folder: Path) -> tuple[list[tuple[str, list[Path]]], list[Path]]:
    """Sorted ``(identity, sorted image files)`` pairs, and the non-image files found on the way."""
    if not folder.is_dir():
        raise FolderLayoutError(f"{folder}: not a folder")
    identities, ignored = [], []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise FolderLayoutError(
                    f"{entry}: image directly under {folder}; expected <identity>/<image>"
                )
            ignored.append(entry)
            continue
        files = []
        for path in sorted(entry.iterdir()):
            (files if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else ignored).append(path)
        if not files:
            raise FolderLayoutError(
                f"{entry}: identity folder holds no images (suffixes {sorted(IMAGE_SUFFIXES)})"
            )
        identities.append((entry.name, files))
    if not identities:
        raise FolderLayoutError(f"{folder}: no identity sub-folders")
    return identities, ignored


def _jpeg_bytes(path: Path, quality: int) -> tuple[bytes, bool]:
    """The file's bytes if it is a JPEG, else the image re-encoded as JPEG; and whether it was a JPEG."""
    data = path.read_bytes()
    if data.startswith(JPEG_SOI):
        return data, True
    import cv2  # only needed for non-JPEG sources

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise FolderLayoutError(f"{path}: not a readable image")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise FolderLayoutError(f"{path}: JPEG encoding failed")
    return buf.tobytes(), False


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def info(rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Summary of a rec: paths, size, record count, header layout, image and identity counts."""
    faces = RecordIOFaceSet(rec_path, idx_path)
    try:
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


def build_parser() -> argparse.ArgumentParser:
    """``info PATH.rec [--idx PATH.idx]`` or ``pack IMAGE_FOLDER OUT_PREFIX [--quality Q]``."""
    parser = argparse.ArgumentParser(prog="python -m data.recordio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="describe a .rec/.idx pair")
    p_info.add_argument("rec", type=Path)
    p_info.add_argument("--idx", type=Path, default=None, help="index file (default: beside the .rec)")
    p_pack = sub.add_parser("pack", help="pack <root>/<identity>/<image> into OUT.rec/.idx/.lst")
    p_pack.add_argument("folder", type=Path)
    p_pack.add_argument("out_prefix", type=Path)
    p_pack.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded non-JPEG images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of :func:`build_parser`; prints JSON."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return run_json_command(lambda: info(args.rec, args.idx))
    return run_json_command(lambda: pack_folder(args.folder, args.out_prefix, args.quality))


if __name__ == "__main__":
    sys.exit(main())
