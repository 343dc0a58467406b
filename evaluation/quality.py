"""Quality-aware evaluation: the error-versus-discard characteristic (EDC) of face image quality measures.

A quality measure is useful to a face recogniser when the comparisons it scores lowest are the ones the
recogniser gets wrong. The EDC (ISO/IEC 29794-1; the evaluation of MagFace, SER-FIQ, CR-FIQA and NIST's face
quality reports) measures that: fix the comparison threshold, discard the lowest-quality comparisons, and
watch the error of the rest fall. The definitions used here (docs/evaluation.md, "Quality:
error-versus-discard"):

* **Threshold** at a target FMR ``f``: of the ``n_imp`` impostor scores (similarities, higher = same),
  ``k = floor(f * n_imp)`` may be false matches; the threshold ``t`` is the ``(k + 1)``-th highest impostor
  score and a pair *matches* when its score is strictly above ``t``. So the FMR is at most ``f`` (below
  it when impostor scores tie at ``t``). It is computed once, on all impostor pairs, and kept fixed.
* **Enough impostors**: ``f`` is evaluated only when ``k >= min_false_matches`` (default 1, i.e.
  ``n_imp >= 1 / f``: the set can tell ``f`` from 0); otherwise it is omitted with the reason.
* **Pair quality** = the lower of its two images' qualities (higher = better); for IJB templates, a
  template's quality is computed first (``validation_ijb.quality``).
* **Discarding** applies to the genuine pairs only, lowest pair quality first; the FNMR is that of the
  genuine pairs kept, at the fixed threshold. Impostor pairs are never discarded (with ``t`` fixed they do
  not enter the FNMR): this is the FNM-EDC of ISO/IEC 29794-1. Pairs of equal quality are discarded
  together (no quality threshold can separate them, and no order among them is invented), so the curve
  has one point per distinct pair quality: after discarding the ``d_j`` genuine pairs of quality below
  ``v_j``, ``FNMR_j = #(false non-matches of quality >= v_j) / (n_gen - d_j)``; with every pair discarded,
  0.
* **pAUC**: the area under the step curve (each FNMR held until the next point) from 0 to the discard
  limit ``L`` (default 0.2), in units of FNMR x fraction discarded, *not* divided by ``L`` (as Schlett et
  al.'s reference EDC code and CR-FIQA report it); ``pauc_relative`` divides it by the random baseline's.
* **Random discard** baseline: the expected FNMR after discarding a uniformly random ``d`` of the ``n_gen``
  genuine pairs is exactly the starting FNMR (the kept ``n_gen - d`` hold ``E (n_gen - d) / n_gen``
  false non-matches on average), a flat line; its pAUC is ``FNMR_0 * L``.

Quality sources: the feature norm of the un-normalised embedding (MagFace, AdaFace), ProbFace's sigma^2
(quality = -mean over dimensions of sigma^2), a detector's face score (YuNet on the raw photo) or a file of
scores per image (:func:`read_scores`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.fileio import atomic_write, write_json

FMRS = (1e-3, 1e-4)
DISCARD_LIMIT = 0.2
REPORT_FRACTIONS = (0.05, 0.1, 0.2)
BUILTIN = ("norm", "sigma2", "detector")
DISCARD_RULE = "genuine pairs only, lowest pair quality first, equal qualities together; threshold fixed"
DESCRIPTIONS = {
    "norm": "feature norm of the image's un-normalised embedding (no flip)",
    "sigma2": "ProbFace: -sigma^2 (mean over dimensions) of the image alone (no flip)",
    "detector": "YuNet face score of the largest face in the raw photo",
}


class QualityError(ValueError):
    """An input the quality evaluation cannot use; the message is one line naming it and what is wrong."""


# ------------------------------------------------------------------------------------------ arithmetic


@dataclass(frozen=True)
class OperatingPoint:
    """The fixed threshold of a target FMR and the errors at it."""

    target: float
    threshold: float
    impostors: int
    allowed: int  # false matches the target allows: floor(target * impostors)
    false_matches: int
    genuine: int
    false_non_matches: int

    @property
    def fmr(self) -> float:
        return self.false_matches / self.impostors

    @property
    def fnmr(self) -> float:
        return self.false_non_matches / self.genuine


def allowed_false_matches(impostors: int, fmr: float) -> int:
    """floor(fmr * impostors), robust to the rounding of the product (3000 * 1e-3 = 3.0000000000000004)."""
    return math.floor(fmr * impostors * (1 + 1e-9))


def too_few_impostors(impostors: int, fmr: float, min_false_matches: int = 1) -> str | None:
    """Why ``fmr`` cannot be evaluated on ``impostors`` impostor pairs, or None when it can."""
    k = allowed_false_matches(impostors, fmr)
    if k >= min_false_matches:
        return None
    need = math.ceil(min_false_matches / fmr * (1 - 1e-9))
    return (
        f"{impostors} impostor pairs allow {k} false matches at FMR {fmr:g}; at least {min_false_matches} "
        f"are needed (at least {need} impostor pairs)"
    )


def operating_point(
    scores: np.ndarray, genuine: np.ndarray, fmr: float, min_false_matches: int = 1
) -> OperatingPoint:
    """The threshold of target ``fmr`` on the impostor scores (module notes) and the errors at it."""
    scores, genuine = np.asarray(scores, np.float64), np.asarray(genuine, bool)
    impostor = np.sort(scores[~genuine])[::-1]
    reason = too_few_impostors(len(impostor), fmr, min_false_matches)
    if reason is not None:
        raise QualityError(reason)
    if not genuine.any():
        raise QualityError("no genuine pairs")
    k = allowed_false_matches(len(impostor), fmr)
    threshold = float(impostor[k])
    return OperatingPoint(
        target=fmr, threshold=threshold, impostors=len(impostor), allowed=k,
        false_matches=int((impostor > threshold).sum()), genuine=int(genuine.sum()),
        false_non_matches=int((scores[genuine] <= threshold).sum()),
    )  # fmt: skip


@dataclass
class EDC:
    """An error-versus-discard curve: ``discard[j]`` (fraction of the genuine pairs discarded) and
    ``fnmr[j]`` of the rest, one point per distinct pair quality plus the final (1, 0)."""

    discard: np.ndarray
    fnmr: np.ndarray
    genuine: int

    def at(self, fraction: float) -> float:
        """FNMR after discarding ``fraction`` (the last point at or before it: a step curve)."""
        return float(self.fnmr[np.searchsorted(self.discard, fraction, side="right") - 1])

    def pauc(self, limit: float = DISCARD_LIMIT) -> float:
        """Area under the step curve from 0 to ``limit`` (not divided by ``limit``)."""
        right = np.minimum(np.r_[self.discard[1:], 1.0], limit)
        widths = np.clip(right - self.discard, 0.0, None)
        return float(np.sum(self.fnmr * widths))


def edc(genuine_scores: np.ndarray, genuine_quality: np.ndarray, threshold: float) -> EDC:
    """The EDC of the genuine pairs (scores and pair qualities) at a fixed ``threshold`` (module notes)."""
    scores = np.asarray(genuine_scores, np.float64)
    quality = np.asarray(genuine_quality, np.float64)
    if scores.shape != quality.shape or scores.ndim != 1 or len(scores) == 0:
        raise QualityError(f"{quality.shape} pair qualities for {scores.shape} genuine scores")
    if not np.isfinite(quality).all():
        raise QualityError(f"{int((~np.isfinite(quality)).sum())} pair qualities are not finite numbers")
    order = np.argsort(quality, kind="stable")
    q, errors = quality[order], (scores[order] <= threshold).astype(np.int64)
    n = len(q)
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])  # discard counts: pairs below each distinct value
    errors_kept = np.cumsum(errors[::-1])[::-1]  # false non-matches among pairs start.. of the sorted order
    fnmr = errors_kept[starts] / (n - starts)
    return EDC(np.r_[starts / n, 1.0], np.r_[fnmr, 0.0], n)


def pair_quality(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Quality of each pair: the lower of its two images' (or templates') qualities."""
    return np.minimum(np.asarray(first, np.float64), np.asarray(second, np.float64))


def evaluate_edc(
    scores: np.ndarray,
    genuine: np.ndarray,
    pair_qualities: Mapping[str, np.ndarray],
    fmrs: Sequence[float] = FMRS,
    limit: float = DISCARD_LIMIT,
    min_false_matches: int = 1,
    fractions: Sequence[float] = REPORT_FRACTIONS,
) -> dict[str, Any]:
    """EDC results per target FMR (key ``f"{fmr:g}"``): the operating point, the random baseline and, per
    quality, pAUC, pAUC relative to random, FNMR at ``fractions`` discarded and the curve. An FMR the set
    cannot resolve has only ``omitted`` (the reason)."""
    scores, genuine = np.asarray(scores, np.float64), np.asarray(genuine, bool)
    if scores.shape != genuine.shape:
        raise QualityError(f"{scores.shape} scores for {genuine.shape} labels")
    for name, q in pair_qualities.items():
        if np.shape(q) != scores.shape:
            raise QualityError(f"quality {name}: {np.shape(q)} pair qualities for {scores.shape} pairs")
    results: dict[str, Any] = {}
    for fmr in fmrs:
        reason = too_few_impostors(int((~genuine).sum()), fmr, min_false_matches)
        if reason is not None:
            results[f"{fmr:g}"] = {"omitted": reason}
            continue
        point = operating_point(scores, genuine, fmr, min_false_matches)
        random_pauc = point.fnmr * limit
        entry: dict[str, Any] = {
            "threshold": point.threshold,
            "impostors": point.impostors,
            "false_matches_allowed": point.allowed,
            "false_matches": point.false_matches,
            "fmr": point.fmr,
            "genuine": point.genuine,
            "false_non_matches": point.false_non_matches,
            "fnmr": point.fnmr,
            "random": {"pauc": random_pauc, "fnmr": point.fnmr},
            "qualities": {},
        }
        for name, q in pair_qualities.items():
            curve = edc(scores[genuine], np.asarray(q)[genuine], point.threshold)
            pauc = curve.pauc(limit)
            entry["qualities"][name] = {
                "pauc": pauc,
                "pauc_relative": pauc / random_pauc if random_pauc > 0 else None,
                "fnmr_at_discard": {f"{x:g}": curve.at(x) for x in fractions},
                "curve": {"discard": curve.discard.tolist(), "fnmr": curve.fnmr.tolist()},
            }
        results[f"{fmr:g}"] = entry
    return results


# ------------------------------------------------------------------------------------- quality sources


def feature_norm(original: np.ndarray) -> np.ndarray:
    """Quality = L2 norm of each image's un-normalised embedding (MagFace, AdaFace)."""
    return np.linalg.norm(np.asarray(original, np.float64), axis=1)


def sigma2_quality(sigma2: np.ndarray) -> np.ndarray:
    """Quality = -sigma^2 (lower uncertainty = higher quality); a per-dimension sigma^2 counts by its
    arithmetic mean over dimensions, as in ProbFace's risk-controlled evaluation (docs/methods.md §5.6)."""
    s = np.asarray(sigma2, np.float64)
    return -s.reshape(len(s), -1).mean(1)


def detect_photos(
    paths: Sequence[Path], detector_model: str | os.PathLike[str] | None = None, crops: bool = False
) -> tuple[dict[Path, float], dict[Path, np.ndarray]]:
    """YuNet's score of the largest face in each distinct photo (0 when it finds none; the face that
    ``scripts/prepare_dataset.py`` aligns), and with ``crops`` the aligned 112 x 112 RGB crop of that face
    (a photo without a face is then an error naming it)."""
    from data.decode import decode_rgb
    from face_alignment import YuNetDetector, align_face, largest_face

    detector = YuNetDetector(detector_model)
    scores: dict[Path, float] = {}
    aligned: dict[Path, np.ndarray] = {}
    for path in dict.fromkeys(paths):
        image = decode_rgb(Path(path).read_bytes(), str(path))
        face = largest_face(detector.detect(image))
        scores[path] = face.score if face is not None else 0.0
        if crops:
            if face is None:
                raise QualityError(f"{path}: the detector finds no face to align")
            aligned[path] = align_face(image, face.landmarks)
    return scores, aligned


@dataclass
class ImageKeys:
    """How a scores file may name the ``count`` images of a set: by index (``0 .. count - 1``) or by one of
    the ``names`` (a name may stand for several images, e.g. a photo used by several pairs)."""

    count: int
    what: str
    names: dict[str, list[int]] = field(default_factory=dict)

    def add(self, index: int, *keys: str) -> None:
        for key in dict.fromkeys(keys):
            self.names.setdefault(key, []).append(index)

    def lookup(self, key: str) -> list[int] | None:
        if key.isdigit():
            return [int(key)] if int(key) < self.count else None
        return self.names.get(key)


def photo_keys(paths: Sequence[Path], root: Path, what: str) -> ImageKeys:
    """Keys of images that are photo files: the path as found, the path under ``root``, the file name and
    its stem (``Aaron_Peirsol_0001``)."""
    keys = ImageKeys(len(paths), what)
    for i, path in enumerate(paths):
        path = Path(path)
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.name
        keys.add(i, str(path), relative, path.name, path.stem)
    return keys


def _fields(line: str) -> list[str]:
    if "," in line:
        return [f.strip() for f in next(csv.reader(io.StringIO(line)))]
    if "\t" in line:
        return [f.strip() for f in line.split("\t")]
    return line.split()


def read_scores(path: str | os.PathLike[str], keys: ImageKeys) -> np.ndarray:
    """Per-image qualities (higher = better) from a file of ``key score`` lines (comma, tab or space
    separated; ``#`` comments and blank lines skipped; a first line whose score is not a number is a
    header). Every image must get exactly one score, and every key must name an image of the set."""
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"{path}: scores file not found" if not path.exists() else f"{path}: not a file")
    values = np.full(keys.count, np.nan)
    given_at = np.zeros(keys.count, np.int64)
    first = True
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = _fields(line)
        if len(fields) != 2:
            raise QualityError(f"{path}:{lineno}: expected 'image score', got {len(fields)} fields: {line!r}")
        key, text = fields
        try:
            score = float(text)
        except ValueError:
            if first:
                first = False
                continue  # a header
            raise QualityError(f"{path}:{lineno}: score {text!r} is not a number") from None
        first = False
        if not math.isfinite(score):
            raise QualityError(f"{path}:{lineno}: score {text!r} is not a finite number")
        images = keys.lookup(key)
        if images is None:
            raise QualityError(f"{path}:{lineno}: no image {key!r} among {keys.what}")
        again = [i for i in images if given_at[i]]
        if again:
            raise QualityError(
                f"{path}:{lineno}: image {key!r} already has a score (line {given_at[again[0]]})"
            )
        values[images] = score
        given_at[images] = lineno
    missing = np.flatnonzero(given_at == 0)
    if len(missing):
        raise QualityError(
            f"{path}: no score for {len(missing)} of {keys.what} (first: image {int(missing[0])})"
        )
    return values


# -------------------------------------------------------------------------------- command-line helpers


def add_quality_arguments(parser: argparse.ArgumentParser, detector_help: str) -> None:
    """The options every EDC command takes: qualities, FMRs, discard limit, outputs."""
    parser.add_argument(
        "--quality", nargs="+", choices=BUILTIN, default=None,
        help=f"qualities to compare (default: norm, unless --scores is given); detector: {detector_help}",
    )  # fmt: skip
    parser.add_argument(
        "--scores", nargs="+", action="extend", default=[], metavar="NAME=FILE",
        help="a quality per image from a file of 'image score' lines (higher = better; the image as its "
             "index or its name); NAME labels it (default: the file's stem)",
    )  # fmt: skip
    parser.add_argument("--probface", type=Path, help="ProbFace checkpoint for --quality sigma2")
    parser.add_argument(
        "--fmr", nargs="+", type=float, default=list(FMRS), help="target FMRs (default 1e-3 1e-4)"
    )
    parser.add_argument(
        "--discard-limit", type=float, default=DISCARD_LIMIT, help="pAUC up to this fraction discarded (0.2)"
    )
    parser.add_argument(
        "--min-false-matches", type=int, default=1, metavar="K",
        help="evaluate an FMR only where the impostor pairs allow at least K false matches (default 1)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results (with the curves) here")
    parser.add_argument("--plot", type=Path, help="write the EDC plot here (.png)")
    parser.add_argument("--dump", type=Path, help="write the pair scores and qualities here (.npz)")


def quality_requests(args: argparse.Namespace) -> tuple[list[str], dict[str, Path]]:
    """(built-in qualities, {name: scores file}) of the options, checked."""
    files: dict[str, Path] = {}
    for item in args.scores:
        name, _, file = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(file).stem
        if not file:
            raise QualityError(f"--scores {item!r}: expected NAME=FILE or FILE")
        if name in BUILTIN or name in files:
            raise QualityError(f"--scores {item!r}: the name {name!r} is taken; write NAME=FILE")
        files[name] = Path(file)
    builtin = list(dict.fromkeys(args.quality if args.quality is not None else ([] if files else ["norm"])))
    if "sigma2" in builtin and args.probface is None:
        raise QualityError("--quality sigma2 needs a ProbFace checkpoint (--probface CKPT)")
    for fmr in args.fmr:
        if not 0 < fmr < 1:
            raise QualityError(f"--fmr {fmr:g}: a target FMR is between 0 and 1")
    if not 0 < args.discard_limit <= 1:
        raise QualityError(f"--discard-limit {args.discard_limit:g}: a fraction in (0, 1]")
    if args.min_false_matches < 1:
        raise QualityError(f"--min-false-matches {args.min_false_matches}: at least 1")
    return builtin, files


def check_fmrs(impostors: int, args: argparse.Namespace, what: str) -> list[str]:
    """Notes for the FMRs the set cannot resolve; an error when it resolves none of them."""
    notes = [
        f"FMR {fmr:g} omitted: {reason}"
        for fmr in args.fmr
        if (reason := too_few_impostors(impostors, fmr, args.min_false_matches)) is not None
    ]
    if len(notes) == len(args.fmr):
        raise QualityError(f"{what}: too small for FMR {', '.join(f'{f:g}' for f in args.fmr)}: " +
                           "; ".join(n.split(": ", 1)[1] for n in notes))  # fmt: skip
    return notes


# ----------------------------------------------------------------------------------------- reporting


def format_report(
    results: Mapping[str, Any], limit: float, fractions: Sequence[float] = REPORT_FRACTIONS
) -> str:
    """One table per target FMR: pAUC, relative to random and FNMR at some discard fractions."""
    lines = []
    width = max([10, *(len(n) for r in results.values() for n in r.get("qualities", {}))])
    for fmr, r in results.items():
        if "omitted" in r:
            lines.append(f"FMR {fmr}: omitted ({r['omitted']})")
            continue
        lines.append(
            f"FMR {fmr}: threshold {r['threshold']:.4f} ({r['false_matches']} of {r['impostors']} impostors "
            f"above it, FMR {r['fmr']:.2e}); FNMR {r['fnmr'] * 100:.2f}% ({r['false_non_matches']} of "
            f"{r['genuine']} genuine)"
        )
        head = f"{'quality':<{width}} {f'pAUC@{limit:g}':>10} {'vs random':>9}"
        lines.append(head + "".join(f" {f'FNMR@{x:g}':>9}" for x in fractions))
        rows = [("random", r["random"]["pauc"], 1.0, [r["random"]["fnmr"]] * len(fractions))]
        for name, q in r["qualities"].items():
            rows.append(
                (name, q["pauc"], q["pauc_relative"], [q["fnmr_at_discard"][f"{x:g}"] for x in fractions])
            )
        for name, pauc, relative, at in rows:
            rel = f"{relative:9.3f}" if relative is not None else f"{'-':>9}"
            lines.append(f"{name:<{width}} {pauc:>10.5f} {rel}" + "".join(f" {v * 100:>8.2f}%" for v in at))
    return "\n".join(lines)


def plot_edc(results: Mapping[str, Any], path: Path, title: str, limit: float) -> Path:
    """One panel per evaluated FMR: each quality's EDC (steps), the random baseline (dashed) and the pAUC
    limit (dotted)."""
    from matplotlib.figure import Figure

    panels = {fmr: r for fmr, r in results.items() if "omitted" not in r}
    fig = Figure(figsize=(5.6 * max(1, len(panels)), 4.6))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    right = min(1.0, 2 * limit)
    for ax, (fmr, r) in zip(axes, panels.items(), strict=False):
        for name, q in r["qualities"].items():
            curve = q["curve"]
            ax.step(np.asarray(curve["discard"]) * 100, np.asarray(curve["fnmr"]) * 100, where="post", lw=1.4,
                    label=f"{name} (pAUC {q['pauc']:.4f})")  # fmt: skip
        ax.plot([0, right * 100], [r["fnmr"] * 100] * 2, "k--", lw=1,
                label=f"random (pAUC {r['random']['pauc']:.4f})")  # fmt: skip
        ax.axvline(limit * 100, color="grey", ls=":", lw=1, label=f"pAUC limit {limit * 100:g}%")
        ax.set_xlim(0, right * 100)
        ax.set_ylim(0, r["fnmr"] * 100 * 1.15 or 1)
        ax.set_xlabel("genuine pairs discarded (%)")
        ax.set_ylabel("FNMR (%)")
        ax.set_title(f"FMR {fmr} (threshold {r['threshold']:.3f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    return path


def write_outputs(
    args: argparse.Namespace,
    results: dict[str, Any],
    title: str,
    dump: Callable[[], dict[str, np.ndarray]],
) -> list[Path]:
    """The JSON, the plot and the dump the options ask for (atomically); returns the files written."""

    written = []
    if args.json:
        write_json(args.json, results)
        written.append(args.json)
    if args.plot:
        written.append(plot_edc(results["edc"], args.plot, title, args.discard_limit))
    if args.dump:
        with atomic_write(args.dump, "wb") as fh:
            np.savez(fh, **dump())
        written.append(args.dump)
    return written
