"""The RecordIO format (dmlc-core ``recordio``, docs/methods.md §1.1): part framing constants, errors, and
the image-record payload (``IRHeader`` + labels + encoded image) with its codec.

* ``.rec`` is a sequence of parts: ``uint32`` magic ``0xced7230a``, ``uint32 lrec`` (low 29 bits: part
  length, top 3 bits: continuation flag), the part's bytes, zero padding to a multiple of 4. A record is
  one part with flag 0, or, when its payload contains the magic number at a 4-byte-aligned position, the
  writer cuts the payload at each such magic (dropping it) and writes parts flagged 1 (first),
  2 (middle), 3 (last); a reader joins the parts and puts the magic back between them.
* An image record's payload is a 24-byte header ``<IfQQ`` (``flag``, ``label``, ``id``, ``id2``); when
  ``flag > 0``, ``flag`` float32 labels follow the header and replace the scalar ``label``; the rest is
  the encoded image.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_PART_LEN = (1 << 29) - 1  # dmlc refuses records of 2**29 bytes or more
PART_HEAD = struct.Struct("<II")
IR_HEAD = struct.Struct("<IfQQ")
IR_HEADER_SIZE = IR_HEAD.size  # 24
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
        return IR_HEAD.pack(0, float(label), id, id2) + data
    labels = np.asarray(label, dtype="<f4").ravel()
    if labels.size == 0:
        raise ValueError("a label array must hold at least one value")
    return IR_HEAD.pack(labels.size, 0.0, id, id2) + labels.tobytes() + data


def unpack(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split an image-record payload into its header and the image bytes; ``where`` prefixes errors."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(
            f"{where}: payload of {len(payload)} bytes is shorter than the {IR_HEADER_SIZE}-byte image header"
        )
    flag, label, id_, id2 = IR_HEAD.unpack_from(payload)
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
