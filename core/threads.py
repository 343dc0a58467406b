"""Thread counts for the CPU work of training, extraction and data loading, chosen in one place.

PyTorch's intra-op pool (OpenMP) splits one operation across threads and ends it at a barrier every thread
must reach. That pays for batched work (a forward pass over a batch, a training step) and costs dearly
for small per-sample work (decoding, augmenting, stacking one image): on a machine whose cores are taken
by other processes, one descheduled thread holds the others at the barrier for a scheduler time slice.
``python -m scripts.bench_data --workers 0`` measured it on a busy 2-core machine: with the batch of 128
decoded faces stacked by ``torch.stack`` (the DataLoader's default collate) on 2 intra-op threads, decode +
augment ran at 89 images/s, and at 917 with the batch stacked by numpy (docs/evaluation.md, "Speed and
memory on CPUs").

The same barrier makes batched work slow when the machine is busy and the batches are small: one
MobileFaceNet forward pass over 1 image took 5.3 s with 2 threads beside other jobs and 0.11 s with one
(64 images: 9.0 and 7.6 s).

So the framework keeps two kinds of work apart (:func:`thread_count` says how many threads each gets):

* ``batched`` (training steps, embedding extraction, the scoring of features): PyTorch's intra-op pool with
  ``OMP_NUM_THREADS`` threads when the environment sets it (torchrun sets 1 for several processes per
  machine), else the cores this process may run on divided by the processes of this machine
  (``LOCAL_WORLD_SIZE``, set by torchrun), and no more than the cores the other processes leave free
  (the cores less those other processes kept busy over the last 0.2 s, :func:`other_load`, rounded; so
  beside one CPU-bound job a 2-core machine gets 1 thread); at least 1. Entry points choose it once, at
  their start (:func:`use_threads`). The 1-minute load average is no guide here: it lags a job that has
  just ended by minutes, and it counts this process's own work;
* ``per_sample`` (decoding, alignment, augmentation, collating a batch, in loader workers and in the main
  process with ``--workers 0`` alike): one thread. Loader workers run it through
  :func:`loader_worker_init` (one PyTorch and one OpenCV thread per worker: the workers are the
  parallelism), and the per-sample code itself uses numpy and OpenCV, never PyTorch's pool
  (``data.transforms.collate_faces`` stacks a batch with numpy).

Thread counts do not change what is computed beyond floating-point summation order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

ROLES = ("batched", "per_sample")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer") from None
    if number < 1:
        raise ValueError(f"environment variable {name}={value!r} must be a positive integer")
    return number


def load_average() -> float:
    """The machine's 1-minute load average (runnable processes), 0 where the system does not say."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) seconds of all CPUs since boot, from ``/proc/stat``; None where it is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / tick, total / tick


def other_load(window_s: float = 0.2) -> float:
    """The cores that other processes keep busy now: every CPU's busy time over ``window_s`` seconds
    (``/proc/stat``) less this process's own CPU time over the same window, divided by the window. Unlike
    the 1-minute load average it does not lag (a job that has just ended counts for nothing) and it
    leaves out this process's own work. Falls back to :func:`load_average` where ``/proc/stat`` is
    missing."""
    before = _cpu_seconds()
    if before is None:
        return load_average()
    own_before, start = time.process_time(), time.perf_counter()
    time.sleep(window_s)
    after, own_after, elapsed = _cpu_seconds(), time.process_time(), time.perf_counter() - start
    if after is None or elapsed <= 0:
        return load_average()
    busy = (after[0] - before[0]) - (own_after - own_before)
    return max(0.0, busy / elapsed)


def thread_count(
    role: str = "batched",
    env: Mapping[str, str] | None = None,
    cores: int | None = None,
    load: float | None = None,
) -> int:
    """Threads for ``role`` (``batched`` or ``per_sample``, see the module notes) in this process;
    ``env``, ``cores`` and ``load`` (the cores other processes keep busy) default to this process's
    environment, :func:`available_cores` and :func:`other_load`."""
    if role not in ROLES:
        raise ValueError(f"thread role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "per_sample":
        return 1
    env = os.environ if env is None else env
    chosen = _positive_int(env, "OMP_NUM_THREADS")
    if chosen is not None:
        return chosen
    cores = available_cores() if cores is None else cores
    local = _positive_int(env, "LOCAL_WORLD_SIZE") or 1
    if cores // local <= 1:
        return 1
    free = round(cores - (other_load() if load is None else load))
    return max(1, min(cores // local, free))


def use_threads(role: str = "batched") -> int:
    """Set PyTorch's intra-op threads to :func:`thread_count` of ``role`` (and, for ``per_sample``,
    OpenCV's to 1); returns the count."""
    import torch

    n = thread_count(role)
    torch.set_num_threads(n)
    if role == "per_sample":
        import cv2

        cv2.setNumThreads(1)
    return n


_FORK_HOOK: list[bool] = []


def fork_safe_opencv() -> None:
    """Make this process safe to fork workers that call OpenCV: its thread pool is stopped now (OpenCV runs
    on the calling thread from here on, in this process and every process it forks) and again before each
    later ``os.fork``, so that code which turns the pool back on cannot reopen the window.

    A process forked while one of the pool's threads holds the pool's lock inherits the lock held and no
    thread to release it: its first parallel OpenCV call (``warpAffine``, ``resize``, ...) waits forever,
    and a DataLoader waits forever for that worker, which is alive. On an idle 2-core machine, forking
    right after a parallel call left 7 children of 2,000 hung, and none of 2,000 with the pool stopped
    (``python -m scripts.check_fork_opencv --trials 2000``, OpenCV 5.0). Every framework code path that
    forks workers calls this first: the training and extraction loaders, the RecordIO audit and
    ``scripts/prepare_dataset.py``."""
    import cv2

    cv2.setNumThreads(0)
    if not _FORK_HOOK:
        os.register_at_fork(before=lambda: cv2.setNumThreads(0))
        _FORK_HOOK.append(True)


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the framework's DataLoaders: a worker does per-sample work with one PyTorch
    thread (the workers are the parallelism). OpenCV's thread count is left alone there: the parent stopped
    its pool before forking (:func:`fork_safe_opencv`), so the worker runs OpenCV on its own thread."""
    del worker_id
    import torch

    torch.set_num_threads(thread_count("per_sample"))
