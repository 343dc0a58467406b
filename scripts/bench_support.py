"""What the benchmarks share: this process's memory as they report it (Linux ``/proc``): the resident set
now, its high-water mark and the reset of that mark, and :class:`Peak` for a phase; and
:func:`busy_processes`, the CPU-bound neighbours a figure "beside a busy process" is measured with.

The kernel keeps the high-water mark of the resident set (``VmHWM``); writing 5 to ``/proc/self/clear_refs``
(Linux 4.0+) resets it to the current size, so the peak of one phase is read without the phases before it.
Where /proc is missing, the peak is the process's maximum so far (``ru_maxrss``).
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

GIB_PER_KIB = 1 / 2**20


def status_kib(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``, ...); NaN where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    """The process's resident set size now, MiB (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def peak_rss_mib() -> float:
    """The process's peak resident set size, MiB: the kernel's high-water mark since the last
    :func:`reset_peak_rss` (``VmHWM``), else the maximum over the process's life (``ru_maxrss``)."""
    peak = status_kib("VmHWM")
    if not math.isnan(peak):
        return peak / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux 4.0+); False where it
    cannot be reset (the peak is then the process's maximum so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Peak:
    """Peak resident memory of a phase, GiB: the high-water mark is reset when it starts. Beside it, the peak
    of the anonymous part (``RssAnon``, sampled every 20 ms): memory the kernel cannot drop, unlike the pages
    of files (the spilled gather of :mod:`core.spill`, a memory-mapped checkpoint), which count in the
    resident set while they are there but leave it under memory pressure."""

    def __enter__(self) -> Peak:
        if not reset_peak_rss():  # a peak that includes earlier phases would be reported as this one's
            raise OSError("cannot reset the peak resident set (/proc/self/clear_refs, Linux 4.0+)")
        self.start, self.t0 = status_kib("VmRSS") * GIB_PER_KIB, time.perf_counter()
        self.anon_start = self.anon_peak = status_kib("RssAnon") * GIB_PER_KIB
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.anon_peak = max(self.anon_peak, status_kib("RssAnon") * GIB_PER_KIB)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._sampler.join()
        self.peak = status_kib("VmHWM") * GIB_PER_KIB
        self.extra = self.peak - self.start
        self.anon_peak = max(self.anon_peak, status_kib("RssAnon") * GIB_PER_KIB)

    def row(self) -> dict[str, float]:
        return {
            "seconds": round(self.seconds, 3),
            "peak_gb": round(self.peak, 3),
            "extra_gb": round(self.extra, 3),
            "anon_extra_gb": round(self.anon_peak - self.anon_start, 3),
        }


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes (``python -c "while True: pass"``) running for the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
