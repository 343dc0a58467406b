"""Checkpoints: one file per save, one dict, written atomically, loaded with ``weights_only=True``.

The dict holds ``format_version``, the resolved ``config``, the ``backbone``/``head`` state dicts (the head
unsharded), ``optimizer``, ``scheduler``, ``scaler``, ``step``/``epoch``, ``sampler`` state, and ``meta``
(architecture, embedding size, input size, colour order, normalisation). Everything in it is tensors and
plain Python values, so loading never unpickles code. It holds no random generator state: ``train.py``
draws everything random from the seed, the rank, the step, the epoch and the image index (see
``train.seed_step``), so the step and the sampler position are all a resumed run needs to draw, on every
rank, what an uninterrupted run would have drawn.

The ``meta`` entries of the backbone (:func:`backbone_meta`) are also what a run compares with its config
before it takes a checkpoint's weights (``model.pretrained``, ``--resume``): other weights are refused in one
line naming the settings that differ (:func:`mismatched`).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.fileio import atomic_path, atomic_write

if TYPE_CHECKING:
    from torch import nn

    from core.config import Config

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


def load_weights(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    what: str = "model file",
    mmap: bool = False,
) -> Any:
    """The contents of a PyTorch file (a checkpoint, a state dict), read with ``weights_only=True``.

    Every way the file can fail to load is a :class:`CheckpointError` of one line naming the file (``what``
    words what it should be): missing, a folder, unreadable, empty, truncated or corrupt, not a PyTorch
    file, or refused because it names a Python object other than tensors and plain containers (a pickled
    model, or code that would run on loading). torch's advice to retry with ``weights_only=False`` is not
    passed on: such a file is refused on purpose.

    ``mmap``: tensors stay in the file (memory-mapped, copy on write) until read, so a reader that takes a
    slice of a large tensor (a rank's block of Partial FC centres) holds only those rows; files of the
    legacy (non-zip) format are read whole."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        if path.is_dir():
            raise CheckpointError(f"{path}: not a readable {what} (a folder, not a file)")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: not a readable {what} (an empty file, 0 bytes)")
        with warnings.catch_warnings():  # a foreign pickle's protocol is refused below, not warned about
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            mmap = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    except Exception as err:  # anything a damaged file makes the unpickler or the zip reader raise
        raise CheckpointError(f"{path}: not a readable {what} ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words (no advice to load unsafely)."""
    text = str(err)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) and unsafe:
        name = unsafe.group(1)
        hint = "; save model.state_dict(), not the model" if name.startswith("torch.nn.") else ""
        return (
            f"refused: loading it would call {name}, which is not tensor data and could run code from the "
            f"file; only tensors, numbers, strings and containers are read{hint}"
        )
    if isinstance(err, EOFError) or "truncated" in text:
        return "truncated: the file ends before its data does"
    if "PytorchStreamReader" in text or "zip archive" in text:
        reason = text.split(". ")[0].replace("PytorchStreamReader failed", "failed").strip()
        return f"corrupt or truncated: {reason}"
    detail = next((line.strip() for line in reversed(text.splitlines()) if "Unsupported" in line), "")
    detail = detail or (text.splitlines()[0].strip() if text.strip() else type(err).__name__)
    return f"not a PyTorch file, or a corrupt one: {detail[:160]}"


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """A checkpoint of this framework (:func:`load_weights`, then its format checked)."""
    return checked_checkpoint(path, load_weights(path, map_location, what="checkpoint", mmap=mmap))


def checked_checkpoint(path: str | os.PathLike[str], state: Any) -> dict[str, Any]:
    """``state`` read from ``path`` if it is a checkpoint of a format this build reads, else a
    :class:`CheckpointError` naming the file."""
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this framework (no format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a format version (1, 2, ...)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this build's {FORMAT_VERSION}")
    return state


def nonfinite_entry(state: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in ``state`` (nested dicts and lists) that holds NaN
    or inf, or None. Such a state is never written: a diverged run's weights would resume nothing."""
    if torch.is_tensor(state):
        return prefix if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, dict):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = nonfinite_entry(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


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
    with atomic_path(dst) as tmp:  # what a kill leaves, remove_stale_temp_files removes
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, tmp)


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


# ------------------------------------------------------------- what a checkpoint's backbone was built for


def backbone_settings(cfg: Config) -> list[tuple[str, str, Any]]:
    """What a backbone's weights were built for: (key in a checkpoint's ``meta``, config key, this config's
    value). A checkpoint that differs in any is refused before its weights are loaded."""
    return [
        ("arch", "model.backbone", cfg.model.backbone),
        ("embedding_size", "model.embedding_size", cfg.model.embedding_size),
        ("input_size", "model.input_size", cfg.model.input_size or cfg.data.image_size),
        ("color", "data.color", cfg.data.color),
    ]


def backbone_meta(cfg: Config) -> dict[str, Any]:
    """The checkpoint's ``meta`` entries of the backbone (what evaluators need to run it)."""
    return {key: value for key, _, value in backbone_settings(cfg)} | {"normalization": NORMALIZATION}


def saved_backbone_settings(cfg: Config, meta: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(meta key, config key, the checkpoint's value or None, this config's value) of every setting."""
    return [(k, key, meta.get(k), value) for k, key, value in backbone_settings(cfg)]


def mismatched(settings: Iterable[tuple[str, str, Any, Any]], known_only: bool = False) -> str:
    """The (meta key, config key, checkpoint's value, this run's value) that differ, as "arch 'r18' (this
    run: 'mbf'), ...; set model.backbone, ... to match it" ('' when none; ``known_only`` passes values the
    checkpoint lacks)."""
    wrong = [(f"{k} {old!r} (this run: {new!r})", key) for k, key, old, new in settings
             if old != new and not (known_only and old is None)]  # fmt: skip
    if not wrong:
        return ""
    keys = ", ".join(dict.fromkeys(key for _, key in wrong))
    return f"{', '.join(text for text, _ in wrong)}; set {keys} to match it"


def load_pretrained(cfg: Config, backbone: nn.Module) -> None:
    """The backbone weights of checkpoint ``model.pretrained`` into ``backbone``, refused in one line when
    they were trained with another architecture, embedding or input size or colour order."""
    path = cfg.model.pretrained
    state = load_checkpoint(path)
    wrong = mismatched(saved_backbone_settings(cfg, state.get("meta", {})))
    if wrong:
        raise CheckpointError(f"model.pretrained {path}: trained with {wrong}")
    backbone.load_state_dict(state["backbone"])


def copy_mapped_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Copy the optimizer state tensors that ``optimizer.load_state_dict`` kept as views of the memory-mapped
    checkpoint ``saved`` (same device and dtype: it does not copy), so a resumed run holds no mapping of a
    file that pruning (``train.keep_last``) may delete."""
    mapped = {v.untyped_storage().data_ptr() for s in saved["state"].values() for v in s.values()
              if torch.is_tensor(v) and v.device.type == "cpu"}  # fmt: skip
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            on_cpu = torch.is_tensor(value) and value.device.type == "cpu"
            if on_cpu and value.untyped_storage().data_ptr() in mapped:
                per_param[key] = value.clone()
