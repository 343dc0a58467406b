"""Checkpoints: one file per save, one dict, written atomically, loaded with ``weights_only=True``.

The dict holds ``format_version``, the resolved ``config``, the ``backbone``/``head`` state dicts (the head
unsharded), ``optimizer``, ``scheduler``, ``scaler``, ``step``/``epoch``, ``sampler`` state, and ``meta``
(architecture, embedding size, input size, colour order, normalisation). Everything in it is tensors and
plain Python values, so loading never unpickles code. It holds no random generator state: ``train.py``
draws everything random from the seed, the rank, the step, the epoch and the image index (see
``train.seed_step``), so the step and the sampler position are all a resumed run needs to draw, on every
rank, what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from core.fileio import WriteError, atomic_write, temp_path

FORMAT_VERSION = 1
NORMALIZATION = "(x/255 - 0.5) / 0.5"
STEP_FILE = re.compile(r"step_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not of this framework's format."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) to ``path`` atomically: a crash leaves the old file."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        torch.save({"format_version": FORMAT_VERSION, **state}, fh)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this framework (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {state['format_version']} is newer than this build's {FORMAT_VERSION}"
        )
    return state


def numbered_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``step_N.pt`` files of ``folder``, oldest (smallest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.fullmatch(p.name)) is not None]
    return [p for _, p in sorted(found)]


def keep_last(folder: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``step_N.pt`` checkpoints in ``folder``; returns the deleted."""
    found = numbered_checkpoints(folder)
    stale = found[: max(0, len(found) - keep)]
    for p in stale:
        p.unlink()
    return stale


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The ``step_N.pt`` with the largest N in ``folder`` (``--resume auto``), or None."""
    found = numbered_checkpoints(folder)
    return found[-1] if found else None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (hard link, or a copy where links fail)."""
    tmp = temp_path(dst)  # the atomic writer's pattern: what a kill leaves, remove_stale_temp_files removes
    try:
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:  # a full disk, a read-only folder
            raise WriteError(dst, exc) from exc
        raise


def save_step_checkpoint(
    folder: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int, best: bool = False
) -> Path:
    """Write ``step_N.pt``, point ``last.pt`` (and ``best.pt`` when ``best``) at it, keep the ``keep``
    newest numbered files. ``last.pt``/``best.pt`` are hard links, so pruning never removes them."""
    folder = Path(folder)
    path = save_checkpoint(folder / f"step_{step}.pt", state)
    _link_or_copy(path, folder / "last.pt")
    if best:
        _link_or_copy(path, folder / "best.pt")
    keep_last(folder, max(1, keep))
    return path


def resolve_resume(spec: str, folder: str | os.PathLike[str]) -> Path | None:
    """``--resume`` argument to a file: ``auto`` is ``folder/last.pt`` (else the newest ``step_N.pt``, else
    None: a fresh start); anything else is a path that must exist."""
    if spec == "auto":
        last = Path(folder) / "last.pt"
        return last if last.is_file() else latest_checkpoint(folder)
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint to resume from not found")
    return path
