"""The MegaFace protocol of the closeness-diversity repository (FFC-derived; docs/methods.md §5.5),
memory-bounded.

Data (insightface's ``megaface_testpack``): probes ``facescrub_images/<identity>/<identity>_<n>.png``,
distractors ``megaface_images/<a>/<b>/<c>.jpg``, and the noise lists ``facescrub_noises.txt`` (one FaceScrub
file name a line, e.g. ``Aaron_Eckhart_136.png``) and ``megaface_noises.txt`` (one path relative to
``megaface_images`` a line, e.g. ``375/37531198@N00/4174611825_0.jpg``, optionally preceded by an index and
a tab); ``#`` lines are comments. Listed images are removed before scoring.

Scores are inner products of unit features. With P probes and D distractors:

* **rank-1 identification**: for every ordered pair (i, j), i != j, of probes of one identity, a success
  when s(i, j) > max_d s(i, d) over all distractors d; accuracy = successes / sum_identities M (M - 1).
  (The official devkit differs slightly; the closeness-diversity README reports this about 0.05 lower.)
* **verification**: every probe against the gallery probes + distractors, its self-match removed; genuine
  = same identity. Scores go to 10,000-bin histograms on [-1, 1]; reverse cumulative sums give FAR and TAR
  at each bin's lower edge, and TAR at a target FAR is interpolated (:func:`interpolate_tar`).

:func:`score_megaface` makes one pass over the distractors, ``chunk`` of them at a time, and keeps only the
running maximum per probe and the two histograms, so a million distractors (memory-mapped ``.npy`` blocks)
never need a P x 1M score matrix; it runs on the GPU when given a CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.image_folder import IMAGE_SUFFIXES

IMAGE_EXTENSIONS = tuple(sorted(IMAGE_SUFFIXES))  # the framework's one list of image suffixes
NUM_BINS = 10_000
FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)
HEADLINE_FAR = 1e-6
SCORES_PER_STEP = 1 << 24  # probes x distractor columns scored at once (64 MiB of float32)


class MegaFaceLayoutError(ValueError):
    """A MegaFace folder or noise list that is not laid out as the protocol needs; names the file/line."""


# ------------------------------------------------------------------------------------------ noise lists


@dataclass
class NoiseList:
    """The distinct entries of a noise list (FaceScrub: file names; MegaFace: ``a/b/c.jpg`` paths)."""

    path: Path
    entries: set[str]


def _noise_lines(path: Path) -> Iterable[tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: noise list not found (pass --keep-noises to score without one)")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def read_facescrub_noises(path: str | os.PathLike[str]) -> NoiseList:
    """``facescrub_noises.txt``: one ``<identity>_<number>.<ext>`` FaceScrub file name a line."""
    path = Path(path)
    entries = set()
    for lineno, line in _noise_lines(path):
        stem, ext = os.path.splitext(line)
        if "/" in line or ext.lower() not in IMAGE_EXTENSIONS or not stem.rpartition("_")[2].isdigit():
            raise MegaFaceLayoutError(
                f"{path}:{lineno}: expected a FaceScrub image name like Aaron_Eckhart_136.png, got {line!r}"
            )
        entries.add(line)
    return NoiseList(path, entries)


def read_megaface_noises(path: str | os.PathLike[str]) -> NoiseList:
    """``megaface_noises.txt``: one ``<a>/<b>/<c>.jpg`` path a line (relative to ``megaface_images``),
    optionally ``<index>\\t<path>`` as some copies of the list have it."""
    path = Path(path)
    entries = set()
    for lineno, line in _noise_lines(path):
        fields = line.split("\t")
        entry = fields[-1].strip()
        parts = entry.split("/")
        ok = len(fields) <= 2 and len(parts) == 3 and all(parts) and entry.lower().endswith(IMAGE_EXTENSIONS)
        if not ok:
            raise MegaFaceLayoutError(
                f"{path}:{lineno}: expected a MegaFace image path like 375/37531198@N00/4174611825_0.jpg, "
                f"got {line!r}"
            )
        entries.add(entry)
    return NoiseList(path, entries)


def _noise_report(noises: NoiseList | None, found: set[str], root: Path, strict: bool) -> dict[str, Any]:
    if noises is None:
        return {"list": None, "listed": 0, "removed": 0, "not_found": 0}
    absent = sorted(noises.entries - found)
    if strict and absent:
        raise MegaFaceLayoutError(
            f"{noises.path}: {len(absent)} of {len(noises.entries)} entries name no image under {root} "
            f"(e.g. {', '.join(absent[:3])}); wrong list or wrong folder?"
        )
    return {"list": str(noises.path), "listed": len(noises.entries), "removed": len(found),
            "not_found": len(absent), "not_found_examples": absent[:5]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class MegaFaceProbes:
    """FaceScrub probe files (grouped by identity, sorted) and the integer identity of each."""

    files: list[Path]
    ids: np.ndarray
    identities: list[str]
    noises: dict[str, Any] = field(default_factory=dict)


def list_facescrub(
    root: str | os.PathLike[str], noises: NoiseList | None = None, strict: bool = False
) -> MegaFaceProbes:
    """The probes under ``root`` (``facescrub_images``): one folder per identity, noise-list files left
    out. With ``strict``, noise entries that name no file under ``root`` are an error."""
    root = Path(root)
    if not root.is_dir():
        raise MegaFaceLayoutError(f"{root}: FaceScrub probe folder not found (facescrub_images/<identity>/)")
    files, ids, identities, removed = [], [], [], set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        kept = [p for p in images if noises is None or p.name not in noises.entries]
        removed.update(p.name for p in images if noises is not None and p.name in noises.entries)
        if kept:
            ids += [len(identities)] * len(kept)
            identities.append(folder.name)
            files += kept
    if not files:
        raise MegaFaceLayoutError(
            f"{root}: no probe images ({', '.join(IMAGE_EXTENSIONS)}) in identity folders"
        )
    report = _noise_report(noises, removed, root, strict)
    return MegaFaceProbes(files, np.array(ids, dtype=np.int64), identities, report)


def list_megaface(
    root: str | os.PathLike[str],
    noises: NoiseList | None = None,
    strict: bool = False,
    limit: int | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """The distractor files under ``root`` (``megaface_images``, any depth, sorted), noise-list files left
    out (an entry matches the last three components of a path), and the noise report. ``limit`` keeps the
    first ``limit`` (a quick run; not the protocol's 1M)."""
    root = Path(root)
    if not root.is_dir():
        raise MegaFaceLayoutError(f"{root}: MegaFace distractor folder not found (megaface_images/)")
    files, removed = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath, name)
            key = "/".join(path.parts[-3:])
            if noises is not None and key in noises.entries:
                removed.add(key)
                continue
            files.append(path)
    if not files:
        raise MegaFaceLayoutError(f"{root}: no distractor images ({', '.join(IMAGE_EXTENSIONS)})")
    report = _noise_report(noises, removed, root, strict)
    return (files[:limit] if limit else files), report


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class MegaFaceScores:
    """What one pass over the scores keeps: each probe's best distractor score and the histograms."""

    max_distractor: np.ndarray  # (P,) float32
    genuine: np.ndarray  # (NUM_BINS,) int64, same-identity probe pairs (self-matches removed)
    impostor: np.ndarray  # (NUM_BINS,) int64, other-identity probes and all distractors


def _bins(scores: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram counts of scores on ``bins`` equal bins of [-1, 1]; scores outside (rounding of unit
    vectors) count in the end bins."""
    index = ((scores + 1.0) * (bins / 2)).floor_().clamp_(0, bins - 1).long()
    return torch.bincount(index.flatten(), minlength=bins)


def score_megaface(
    probes: np.ndarray,
    probe_ids: np.ndarray,
    distractors: Sequence[np.ndarray] | np.ndarray,
    chunk: int | None = None,
    bins: int = NUM_BINS,
    device: str | torch.device = "cpu",
) -> MegaFaceScores:
    """One pass over the scores of unit ``probes`` against the probes and the ``distractors`` (an array or
    a sequence of arrays, e.g. memory-mapped ``.npy`` blocks), ``chunk`` gallery columns at a time
    (default: :data:`SCORES_PER_STEP` scores per step)."""
    probes = np.array(probes, np.float32)  # a writable copy (the input may be a read-only memory map)
    probe_ids = np.array(probe_ids)
    if probes.ndim != 2 or len(probes) != len(probe_ids):
        raise ValueError(f"probes: {probes.shape} features for {len(probe_ids)} identities; need (P, D)")
    n, dim = probes.shape
    chunk = chunk or max(1, SCORES_PER_STEP // n)
    device = torch.device(device)
    p = torch.from_numpy(probes).to(device)
    ids = torch.from_numpy(probe_ids).to(device)
    rows = torch.arange(n, device=device)
    genuine = torch.zeros(bins, dtype=torch.int64, device=device)
    impostor = torch.zeros(bins, dtype=torch.int64, device=device)
    for start in range(0, n, chunk):
        cols = torch.arange(start, min(start + chunk, n), device=device)
        scores = p @ p[cols].T
        same = ids[:, None] == ids[cols][None, :]
        itself = rows[:, None] == cols[None, :]
        genuine += _bins(scores[same & ~itself], bins)
        impostor += _bins(scores[~same], bins)
    best = torch.full((n,), -torch.inf, device=device)
    blocks = [distractors] if isinstance(distractors, np.ndarray) else list(distractors)
    for block in blocks:
        if block.ndim != 2 or block.shape[1] != dim:
            raise ValueError(f"distractor block of shape {block.shape}; need (N, {dim})")
        for start in range(0, len(block), chunk):
            d = torch.from_numpy(np.array(block[start : start + chunk], np.float32)).to(device)
            scores = p @ d.T
            best = torch.maximum(best, scores.max(dim=1).values)
            impostor += _bins(scores, bins)
    return MegaFaceScores(best.cpu().numpy(), genuine.cpu().numpy(), impostor.cpu().numpy())


def rank1_identification(
    probes: np.ndarray, probe_ids: np.ndarray, max_distractor: np.ndarray
) -> tuple[float, int, int]:
    """(accuracy, successes, pairs): the ordered same-identity pairs (i, j), i != j, with
    s(i, j) > ``max_distractor[i]``, over all such pairs."""
    probes, probe_ids = np.asarray(probes, np.float32), np.asarray(probe_ids)
    order = np.argsort(probe_ids, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(probe_ids[order]) != 0])
    successes = pairs = 0
    for group in np.split(order, starts[1:]):
        m = len(group)
        if m < 2:
            continue
        hits = probes[group] @ probes[group].T > max_distractor[group][:, None]
        np.fill_diagonal(hits, False)
        successes += int(hits.sum())
        pairs += m * (m - 1)
    if pairs == 0:
        raise ValueError("no identity has two probe images: rank-1 identification needs same-identity pairs")
    return successes / pairs, successes, pairs


def roc_from_histograms(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(far, tar) at each bin's lower edge: the fractions of impostor and genuine scores in that bin or
    above (reverse cumulative sums), so both fall from 1 at bin 0."""
    genuine, impostor = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if genuine.sum() == 0 or impostor.sum() == 0:
        raise ValueError("verification needs genuine and impostor scores")
    far = np.cumsum(impostor[::-1])[::-1] / impostor.sum()
    tar = np.cumsum(genuine[::-1])[::-1] / genuine.sum()
    return far, tar


def interpolate_tar(far: np.ndarray, tar: np.ndarray, target: float) -> float:
    """TAR at a target FAR from the (non-increasing) curve of :func:`roc_from_histograms`.

    A bin edge with exactly that FAR gives its TAR (the lowest such edge, the largest TAR). Otherwise the
    target lies between the last edge above it (l) and the next one below it (u) and TAR is linearly
    interpolated between them. As in the reference implementation, the result is 0 when the FAR of l is
    8 or more times the target (the histogram cannot resolve it) or no edge reaches below the target.
    """
    if not 0 < target < 1:
        raise ValueError(f"a target FAR must lie in (0, 1), got {target}")
    exact = np.flatnonzero(far == target)
    if len(exact):
        return float(tar[exact[0]])
    below = np.flatnonzero(far < target)
    if len(below) == 0:
        return 0.0
    u = below[0]  # >= 1: far[0] = 1 (every score lies in bin 0 or above)
    lo = u - 1
    if far[lo] >= 8 * target:
        return 0.0
    return float(tar[lo] + (target - far[lo]) / (far[u] - far[lo]) * (tar[u] - tar[lo]))


def tar_at_fars(
    genuine: np.ndarray, impostor: np.ndarray, fars: Iterable[float] = FARS
) -> dict[float, float]:
    """TAR at each target FAR (:func:`interpolate_tar`) from the two histograms."""
    far, tar = roc_from_histograms(genuine, impostor)
    return {float(t): interpolate_tar(far, tar, t) for t in fars}
