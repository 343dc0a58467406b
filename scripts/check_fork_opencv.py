"""How often a process forked after a parallel OpenCV call hangs, with OpenCV's pool left running and with
:func:`core.threads.fork_safe_opencv`.

Each trial: the parent runs a parallel ``cv2.warpAffine`` (a 1000x1000 image, OpenCV's default thread
count), forks, and the child warps and resizes a face-sized crop, as a DataLoader worker does; a child not
done within ``--wait`` seconds is counted as hung and killed. The pool-left-running trials run first: once
:func:`fork_safe_opencv` has been called, its fork hook guards every later fork of the process.

    python -m scripts.check_fork_opencv --trials 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np

from core.threads import fork_safe_opencv, load_average


def trials(count: int, wait_s: float, safe: bool) -> int:
    """Hung children out of ``count`` forks."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    warp = np.float32([[0.9, 0.1, 3], [-0.1, 0.9, 5]])
    default = cv2.getNumThreads()
    hung = 0
    for _ in range(count):
        cv2.setNumThreads(default)  # the pool back on: code the process runs between forks may do this
        cv2.warpAffine(image, warp, (1000, 1000))
        if safe:
            fork_safe_opencv()
        pid = os.fork()
        if pid == 0:  # the child: a worker's per-sample work, then out without the parent's cleanup
            cv2.warpAffine(image[:200, :200], warp, (112, 112))
            cv2.resize(image, (500, 500))
            os._exit(0)
        hung += exit_code_within(pid, wait_s) is None
    return hung


def exit_code_within(pid: int, wait_s: float) -> int | None:
    """The exit code of the child ``pid`` if it ends within ``wait_s`` seconds; else it is killed (hung)
    and the answer is None."""
    deadline = time.monotonic() + wait_s
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(done[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="forks per setting (default: 300)")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds before a child counts as hung")
    args = parser.parse_args(argv)
    load = load_average()
    row = {
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "trials": args.trials,
        "hung_pool_running": trials(args.trials, args.wait, safe=False),
        "hung_fork_safe_opencv": trials(args.trials, args.wait, safe=True),
        "load_average_at_start": round(load, 2),
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
