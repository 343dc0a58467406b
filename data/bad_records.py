"""What a training run does with an image it cannot use (``data.bad_records``), wherever it is read.

A record that cannot be read (a damaged RecordIO part, a file that vanished), an image that cannot be
decoded (empty, truncated, not an image) or one that is not ``data.image_size`` square is a *bad record*.
The run either stops with one line naming it (``stop``, the default) or trains on another image of the
same identity in its place and counts it (``skip``), stopping once more than ``data.max_bad_records``
distinct records have failed, so that a mostly broken file still stops early.

DataLoader workers never raise for a bad record: an exception raised in a worker reaches the main process
as a many-line dump ("Caught DecodeError in DataLoader worker process 0 ... Original Traceback"). A worker
returns the problem with the batch instead, and :class:`ScreenedLoader` turns it, in the main process,
into the same one-line :class:`BadRecordError` that ``num_workers: 0`` gives, or into the count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from core.config import ConfigError
from data.decode import DecodeError, ImageSizeError
from data.recordio import RecordIOError

# Faults of one record, as opposed to faults of the program: these make a record bad.
RECORD_ERRORS: tuple[type[Exception], ...] = (DecodeError, ImageSizeError, RecordIOError, OSError)


class BadRecordError(ValueError):
    """A training image that cannot be used; the message names the record and the fault in one line."""


def describe_error(err: Exception) -> str:
    """One line for a record fault (an ``OSError`` names its file)."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: cannot be read: {err.strerror or err}"
    return str(err).replace("\n", " ")


class BadRecords:
    """The ``data.bad_records`` policy and, in the main process, the bad records found so far.

    Args:
        mode: ``stop`` or ``skip``.
        limit: in ``skip`` mode, the run stops when more than this many distinct records have failed.
        root: the data the run reads (``data.root``), named in the messages for ``check``.
    """

    def __init__(self, mode: str = "stop", limit: int = 100, root: str = "") -> None:
        if mode not in ("stop", "skip"):
            raise ConfigError(f"data.bad_records must be 'stop' or 'skip', got {mode!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"data.max_bad_records must be an integer >= 0, got {limit!r}")
        self.mode, self.limit, self.root = mode, limit, root
        self.found: dict[int, str] = {}  # position -> what is wrong with it, in the order found
        self._unlogged: list[str] = []

    @property
    def count(self) -> int:
        return len(self.found)

    def _check_hint(self) -> str:
        target = self.root or "the data"
        return f"`python -m data.recordio check {target}` lists every bad record"

    def add(self, position: int, problem: str) -> None:
        """Take note of bad record ``position``: the error in ``stop`` mode, counted in ``skip`` mode."""
        if self.mode == "stop":
            raise BadRecordError(
                f"{problem}; {self._check_hint()}, and data.bad_records=skip trains past such images"
            )
        if position in self.found:
            return
        self.found[position] = problem
        self._unlogged.append(problem)
        if len(self.found) > self.limit:
            raise BadRecordError(
                f"{len(self.found)} bad records, more than data.max_bad_records={self.limit}; the latest: "
                f"{problem}; {self._check_hint()}"
            )

    def add_report(self, report: str) -> None:
        """Take note of what :meth:`report` wrote in a worker."""
        for line in report.splitlines():
            position, problem = line.split("\t", 1)
            if int(position) < 0:  # no readable replacement was found
                raise BadRecordError(problem)
            self.add(int(position), problem)

    @staticmethod
    def report(position: int, problem: str) -> str:
        """One bad record as a line of the text a worker returns with the image."""
        return f"{position}\t{problem}"

    def take_unlogged(self) -> list[str]:
        """The bad records found since the last call (to write each to train.log once)."""
        lines, self._unlogged = self._unlogged, []
        return lines

    def summary(self) -> str:
        return f"{self.count} bad records skipped (data.bad_records=skip); {self._check_hint()}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "found": {}, "_unlogged": []}  # workers report, they do not count


class ScreenedLoader:
    """Iterates a DataLoader of ``(image, label, index, report)`` batches as ``(image, label, index)``,
    handing every report to :meth:`BadRecords.add_report` in the main process."""

    def __init__(self, loader: Iterable[Any], bad_records: BadRecords) -> None:
        self.loader, self.bad_records = loader, bad_records

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for images, labels, indices, reports in self.loader:
            for report in reports:
                if report:
                    self.bad_records.add_report(report)
            yield images, labels, indices
