"""A training run's output folder: which files are the run's, refusing to mix two runs in one folder, and the
run's first writes there.

A run owns ``step_N.pt``, ``last.pt``, ``best.pt``, ``config.yaml``, ``train.log`` and ``tensorboard/`` in
its folder; anything else there is the user's and is never touched. A new run into a folder that holds
another run's checkpoints is refused (it would overwrite and prune them) unless asked to start over, and then
the old run's files are moved into ``replaced_<date-time>/`` beside them, never deleted.
"""

from __future__ import annotations

import time
from pathlib import Path

from core.checkpoint import STEP_FILE, numbered_checkpoints
from core.fileio import remove_stale_temp_files

# the files of a run in its output folder besides its checkpoints
RUN_FILES = ("config.yaml", "train.log", "tensorboard", "last.pt", "best.pt")


class OutputDirError(RuntimeError):
    """An output folder that this run may not write into as asked; the message says what to do instead."""


def run_checkpoints(out: Path) -> list[Path]:
    """The checkpoints in ``out``: ``step_N.pt`` (oldest first), then last.pt and best.pt."""
    return numbered_checkpoints(out) + [out / n for n in ("last.pt", "best.pt") if (out / n).is_file()]


def check_output_dir(out: Path, resumed: Path | None, step: int, overwrite: bool) -> None:
    """Refuse to mix two runs in ``out``: a new run (``resumed`` None) where checkpoints are, or a run
    resumed at ``step`` where newer checkpoints of another course of the run are (they would be overwritten,
    pruned and re-pointed). ``overwrite`` allows both: :func:`prepare_output_dir` moves them aside."""
    found = run_checkpoints(out) if out.is_dir() else []
    if overwrite or not found:
        return
    aside = f"--overwrite to start over (its files are moved to {out / 'replaced_<date-time>'}/)"
    if resumed is None:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise OutputDirError(
            f"output_dir {out} already holds checkpoints ({names}): a new run would overwrite and prune "
            f"them; continue that run with --resume auto, choose a new output_dir, or pass {aside}"
        )
    newer = [p for p in numbered_checkpoints(out) if int(STEP_FILE.fullmatch(p.name).group(1)) > step]
    if newer:
        raise OutputDirError(
            f"output_dir {out} holds {newer[-1].name}, newer than step {step} of --resume {resumed}: "
            f"continuing there would mix two runs; --resume auto continues the newest, a new output_dir "
            f"keeps both, or pass {aside}"
        )


def prepare_output_dir(out: Path, overwrite: bool) -> tuple[list[Path], Path | None]:
    """The first writes of the one process that writes ``out``, after :func:`check_output_dir` passed: the
    previous run's files moved aside (``overwrite``; nothing is deleted or copied) and the partial files of
    saves a kill interrupted removed. Returns (the removed partial files, the folder the previous run's files
    went to, or None)."""
    aside = None
    if overwrite and out.is_dir() and run_checkpoints(out):
        previous = [*run_checkpoints(out), *(out / name for name in RUN_FILES)]
        aside = out / f"replaced_{time.strftime('%Y%m%d-%H%M%S')}"
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        aside.mkdir()
        for item in dict.fromkeys(p for p in previous if p.exists()):
            item.rename(aside / item.name)  # the same file system: instant, and nothing is copied
    return remove_stale_temp_files(out), aside
