"""The images of an InsightFace ``train.rec`` (or an ``im2rec`` rec without header), by position.

InsightFace training sets add a layout on top of the records: record 0 is a meta header whose labels are
``[image_end, identity_end]``; keys ``1 .. image_end-1`` are images labelled with their class id; keys
``image_end .. identity_end-1`` hold one record per class whose labels are the ``[first, end)`` keys of
its images. A rec made by ``im2rec`` has no header (record 0 has ``flag == 0`` or no record 0 exists):
every key of the ``.idx`` is an image.
"""

from __future__ import annotations

import os

import numpy as np

from data.recordio.format import IR_HEAD, IR_HEADER_SIZE, IRHeader, RecordIOError, class_id, unpack
from data.recordio.reader import IndexedRecordIO


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
            flag = IR_HEAD.unpack_from(payload)[0]
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
