"""What a run reports: a plain-text log, TensorBoard scalars and a tqdm progress bar, on rank 0 only.

Other ranks get a logbook that does nothing, so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from core.fileio import WriteError


class Logbook:
    """``DIR/train.log`` (appended, so a resumed run continues it), ``DIR/tensorboard/`` and a progress bar.

    Args:
        folder: the run's output folder.
        total_steps: optimizer steps of the whole run (for the bar and the ETA).
        start_step: step the run starts (or resumes) at.
        enabled: False on ranks other than 0.
    """

    def __init__(self, folder: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.log: TextIO | None = None
        self.writer: Any = None
        if not enabled:
            return
        folder = Path(folder)
        self.path = folder / "train.log"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.log = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise WriteError(self.path, err) from err
        from torch.utils.tensorboard import SummaryWriter  # imported here: rank 0 only, and slow to import

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step or None)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr,
            disable=None,  # no bar when stderr is not a terminal (CI logs, nohup)
        )  # fmt: skip

    def line(self, text: str) -> None:
        """One timestamped line in train.log, echoed to the console without breaking the bar."""
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        assert self.log is not None
        try:
            self.log.write(stamped + "\n")
            self.log.flush()
        except OSError as err:  # a full disk: name the log, not a bare "[Errno 28]"
            raise WriteError(self.path, err) from err
        tqdm.write(stamped, file=sys.stdout)

    def stopped(self, reason: str) -> None:
        """The last line of train.log: why the run ended. Best effort: when the log itself cannot be
        written (the disk is full) the console still gets the reason from the caller."""
        with contextlib.suppress(OSError):
            self.line(f"stopped: {reason}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, steps: int, postfix: dict[str, str]) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        assert self.log is not None
        self.log.close()


def read_scalars(run_dir: str | os.PathLike[str], tags: dict[str, str]) -> dict[str, list[float]]:
    """Scalars a run wrote to ``run_dir/tensorboard``: for each ``name: tag`` of ``tags`` found there,
    ``name`` (the values) and ``name_step`` (their steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    found = events.Tags()["scalars"]
    curves: dict[str, list[float]] = {}
    for name, tag in tags.items():
        if tag in found:
            scalars = events.Scalars(tag)
            curves[f"{name}_step"] = [s.step for s in scalars]
            curves[name] = [s.value for s in scalars]
    return curves
