"""The TinyFace closed-set identification protocol (docs/methods.md §5.4), as AdaFace evaluates it.

The test split has three folders of pre-aligned crops (AdaFace's MTCNN-aligned copy
``aligned_pad_0.1_pad_high``): ``Probe/``, ``Gallery_Match/`` and ``Gallery_Distractor/``. A file's identity
is the number its name starts with, up to the first ``_`` (``1_3.jpg`` is identity ``1``; AdaFace reads it
as ``int(name.split('_')[0])``); distractors belong to no identity (AdaFace labels them -100). Names of
another kind (LFW's ``First_Last_0001.jpg`` would give identity ``First``) are refused; their identities
come from an identity list instead (:func:`read_identity_list`). The gallery is the match images followed
by the distractors; each probe is scored against all of them by inner product of unit features
(flip-fused), and its rank is the position of its best mate. Reported: the closed-set CMC at ranks 1, 5
and 20 (DIR at FAR = 1: every probe has a mate in the gallery).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.identification import closed_set_ranks, cmc

FOLDERS = ("Probe", "Gallery_Match", "Gallery_Distractor")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
RANKS = (1, 5, 20)
# Where the three folders may sit under --data-root: the aligned copy first (AdaFace's layout), then the
# root itself; the raw ``tinyface/Testing_Set`` last (its images are not aligned, see find_testing_set).
CANDIDATES = (
    "aligned_pad_0.1_pad_high",
    "tinyface/aligned_pad_0.1_pad_high",
    ".",
    "tinyface/Testing_Set",
    "Testing_Set",
)


class TinyFaceLayoutError(ValueError):
    """A TinyFace folder that does not have the layout the protocol needs; the message names it."""


@dataclass
class TinyFaceSet:
    """The image files of the test split in feature order (probes, gallery matches, distractors) and
    the integer identity of each probe and gallery match (file-name prefixes, numbered in sorted order)."""

    root: Path
    probes: list[Path]
    matches: list[Path]
    distractors: list[Path]
    probe_ids: np.ndarray
    match_ids: np.ndarray
    identities: list[str]
    identity_source: str = "file names (<id>_<n>.jpg)"

    @property
    def files(self) -> list[Path]:
        """All images, in the order their features are extracted."""
        return [*self.probes, *self.matches, *self.distractors]

    @property
    def raw_split(self) -> bool:
        """Whether these are the unaligned images of the original ``Testing_Set``."""
        return self.root.name == "Testing_Set"


def find_testing_set(data_root: str | os.PathLike[str]) -> Path:
    """The folder holding ``Probe/``, ``Gallery_Match/`` and ``Gallery_Distractor/``: ``data_root`` itself
    or one of the usual places under it (:data:`CANDIDATES`)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise TinyFaceLayoutError(f"{data_root}: TinyFace data root not found")
    for candidate in CANDIDATES:
        folder = (data_root / candidate).resolve() if candidate != "." else data_root
        if all((folder / name).is_dir() for name in FOLDERS):
            return folder
    tried = ", ".join(str(data_root / c) for c in CANDIDATES)
    raise TinyFaceLayoutError(
        f"{data_root}: no TinyFace test split found; need {', '.join(f + '/' for f in FOLDERS)} in one of: "
        f"{tried}"
    )


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise TinyFaceLayoutError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def identity_of(path: Path) -> str | None:
    """The identity a TinyFace file name carries: the number before its first ``_`` (leading zeros
    dropped, as ``int`` reads it); None when the name does not start that way."""
    prefix, underscore, _ = path.stem.partition("_")
    if not underscore or not (prefix.isascii() and prefix.isdigit()):
        return None
    return str(int(prefix))


LFW_NAME = re.compile(r"[A-Za-z][\w-]*_[A-Za-z][\w-]*_\d{4}")  # First_Last_0001 (LFW's names)


def _refuse_names(root: Path, files: list[Path], bad: list[Path]) -> TinyFaceLayoutError:
    example = bad[0].relative_to(root).as_posix()
    why = "no numeric TinyFace identity '<id>_' at their start"
    if LFW_NAME.fullmatch(bad[0].stem):
        why += "; they look like LFW's First_Last_NNNN, which the TinyFace rule would merge by first name"
    return TinyFaceLayoutError(
        f"{root}: {len(bad)} of {len(files)} Probe/Gallery_Match file names (e.g. {example}) have {why}; "
        "give each image's identity with an identity list (--identities FILE, lines '<image> <identity>')"
    )


def read_identity_list(path: str | os.PathLike[str]) -> dict[str, str]:
    """An identity list: one ``<image> <identity>`` per line (blank lines and ``#`` comments skipped),
    the image given by its path under the test split (``Probe/a_1.jpg``) or its bare file name.
    A malformed line, or an image listed twice with two identities, is an error naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TinyFaceLayoutError(f"{path}: cannot read the identity list: {err}") from None
    identities: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise TinyFaceLayoutError(f"{path}:{number}: {len(fields)} fields; expected '<image> <identity>'")
        image, identity = fields
        first = identities.setdefault(image, (identity, number))
        if first[0] != identity:
            raise TinyFaceLayoutError(
                f"{path}:{number}: {image} is identity {identity!r} here but {first[0]!r} at line {first[1]}"
            )
    if not identities:
        raise TinyFaceLayoutError(f"{path}: empty identity list")
    return {image: identity for image, (identity, _) in identities.items()}


def _listed_identities(root: Path, files: list[Path], listed: Mapping[str, str], source: str) -> list[str]:
    found = [listed.get(f.relative_to(root).as_posix(), listed.get(f.name)) for f in files]
    missing = [f for f, identity in zip(files, found, strict=True) if identity is None]
    if missing:
        raise TinyFaceLayoutError(
            f"{source}: no identity for {len(missing)} of the {len(files)} Probe/Gallery_Match images of "
            f"{root} (e.g. {missing[0].relative_to(root).as_posix()})"
        )
    return [str(identity) for identity in found]


def read_tinyface(
    root: str | os.PathLike[str], identities: str | os.PathLike[str] | Mapping[str, str] | None = None
) -> TinyFaceSet:
    """The files and identities of a test split folder (see :func:`find_testing_set`).

    Identities come from the TinyFace file names (``<id>_<n>.jpg``; other names are refused), or from
    ``identities``: an identity list file (:func:`read_identity_list`) or a mapping of the same keys, for a
    folder of one's own whose names do not carry TinyFace identities. Distractors need none."""
    root = Path(root)
    for name in FOLDERS:
        if not (root / name).is_dir():
            raise TinyFaceLayoutError(f"{root}: missing folder {name}/ (need {', '.join(FOLDERS)})")
    probes, matches, distractors = (_images(root / name) for name in FOLDERS)
    labelled = [*probes, *matches]
    if identities is None:
        source = TinyFaceSet.identity_source
        names = [identity_of(p) for p in labelled]
        bad = [p for p, n in zip(labelled, names, strict=True) if n is None]
        if bad:
            raise _refuse_names(root, labelled, bad)
    else:
        if isinstance(identities, Mapping):
            listed, source = identities, "identity list"
        else:
            listed, source = read_identity_list(identities), str(identities)
        names = _listed_identities(root, labelled, listed, source)
    probe_names, match_names = names[: len(probes)], names[len(probes) :]
    labels = sorted(set(probe_names) | set(match_names))
    code = {name: i for i, name in enumerate(labels)}
    missing = sorted(set(probe_names) - set(match_names))
    if missing:
        example = next(p for p, n in zip(probes, probe_names, strict=True) if n == missing[0])
        raise TinyFaceLayoutError(
            f"{root}: {len(missing)} probe identities have no image in Gallery_Match/ "
            f"(e.g. identity {missing[0]!r} of {example.name}); closed-set identification needs a mate"
        )
    return TinyFaceSet(
        root=root,
        probes=probes,
        matches=matches,
        distractors=distractors,
        probe_ids=np.array([code[n] for n in probe_names], dtype=np.int64),
        match_ids=np.array([code[n] for n in match_names], dtype=np.int64),
        identities=labels,
        identity_source=source,
    )


def identification(
    features: np.ndarray, tinyface: TinyFaceSet, ranks: Iterable[int] = RANKS, chunk: int = 65536
) -> dict[str, float | int]:
    """Rank-k identification rates of unit ``features`` (rows in :attr:`TinyFaceSet.files` order).

    Ties between a mate and a non-mate count for the probe (a rank is 1 + the number of gallery entries of
    other identities scoring strictly above the best mate).
    """
    n_probe, n_match = len(tinyface.probes), len(tinyface.matches)
    if len(features) != n_probe + n_match + len(tinyface.distractors):
        raise ValueError(
            f"{len(features)} features for {n_probe + n_match + len(tinyface.distractors)} TinyFace images"
        )
    probe_ranks = closed_set_ranks(
        features[:n_probe],
        tinyface.probe_ids,
        features[n_probe : n_probe + n_match],
        tinyface.match_ids,
        distractors=features[n_probe + n_match :],
        chunk=chunk,
    )
    result: dict[str, float | int] = {f"rank-{k}": v for k, v in cmc(probe_ranks, ranks).items()}
    result.update(
        probes=n_probe,
        gallery_matches=n_match,
        distractors=len(tinyface.distractors),
        identities=len(np.unique(tinyface.probe_ids)),
    )
    return result
