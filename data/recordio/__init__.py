"""MXNet / InsightFace RecordIO (``.rec`` + ``.idx`` + ``.lst``): reader, writer and folder packer.

Implemented with ``struct`` and ``mmap`` only; MXNet is not needed to read or write these files, and the
files written here are byte-for-byte what MXNet's ``MXIndexedRecordIO`` writes for the same payloads
(docs/methods.md §1.1).

Where each part lives:

* :mod:`~data.recordio.format`: the part framing, the image-record header (``IRHeader``, :func:`pack`,
  :func:`unpack`) and the errors;
* :mod:`~data.recordio.index`: ``.idx`` files (one ``key<TAB>byte_offset`` line per record);
* :mod:`~data.recordio.reader`: :class:`IndexedRecordIO`, random access to records over a mmap;
* :mod:`~data.recordio.dataset`: :class:`RecordIOFaceSet`, the images and identities of a training set
  (InsightFace's meta-header layout, or an ``im2rec`` rec without one);
* :mod:`~data.recordio.writer`: :class:`RecordIOWriter`, atomic, byte-identical to MXNet;
* :mod:`~data.recordio.packer`: :func:`pack_folder`, ``<root>/<identity>/<image>`` -> ``OUT.rec/.idx/.lst``;
* :mod:`~data.recordio.audit`: :func:`info` and :func:`check`, every problem of a rec or an image folder;
* :mod:`~data.recordio.cli`: the command line.

Command line::

    python -m data.recordio info PATH.rec            # one JSON object describing the file
    python -m data.recordio check PATH.rec           # decode every record, list every problem
    python -m data.recordio pack IMAGE_FOLDER OUT    # OUT.rec, OUT.idx, OUT.lst from <id>/<img> folders

``info`` reads the index, the meta header, the identity records and the 8-byte part header of every
record (magic number, length within the file), so a damaged record anywhere is an error, not a healthy
summary. ``check`` reads everything: every image is decoded and its size checked, every label is compared
with the identity table; it reports all problems, one line each, and exits 1 if there is any.
"""

from data.image_folder import FolderLayoutError  # the packer's folder errors
from data.recordio.audit import check, info
from data.recordio.cli import build_parser, main
from data.recordio.dataset import RecordIOFaceSet
from data.recordio.format import (
    FIRST,
    IR_HEADER_SIZE,
    JPEG_SOI,
    LAST,
    MAGIC,
    MAGIC_BYTES,
    MAX_PART_LEN,
    MIDDLE,
    WHOLE,
    IRHeader,
    RecordIOError,
    RecordLabelError,
    class_id,
    pack,
    unpack,
)
from data.recordio.index import read_index
from data.recordio.packer import pack_folder
from data.recordio.reader import IndexedRecordIO, find_recordio
from data.recordio.writer import RecordIOWriter

__all__ = [
    "FIRST",
    "IR_HEADER_SIZE",
    "JPEG_SOI",
    "LAST",
    "MAGIC",
    "MAGIC_BYTES",
    "MAX_PART_LEN",
    "MIDDLE",
    "WHOLE",
    "FolderLayoutError",
    "IRHeader",
    "IndexedRecordIO",
    "RecordIOError",
    "RecordIOFaceSet",
    "RecordIOWriter",
    "RecordLabelError",
    "build_parser",
    "check",
    "class_id",
    "find_recordio",
    "info",
    "main",
    "pack",
    "pack_folder",
    "read_index",
    "unpack",
]
