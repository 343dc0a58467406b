"""Reader of the insightface ``IJB_release`` layout of IJB-B / IJB-C (docs/methods.md §5.3).

    <root>/IJBC/loose_crop/1.jpg ...                  the face photos (loose crops)
    <root>/IJBC/meta/ijbc_name_5pts_score.txt          "1.jpg x1 y1 ... x5 y5 faceness" per image
    <root>/IJBC/meta/ijbc_face_tid_mid.txt             "1.jpg template_id media_id", same image order
    <root>/IJBC/meta/ijbc_template_pair_label.txt      "t1 t2 label" (1 = same subject) per 1:1 pair
    <root>/IJBC/meta/ijbc_1N_gallery_G1.csv, _G2.csv   1:N galleries (IJB-B: ijbb_1N_gallery_S1/S2.csv)
    <root>/IJBC/meta/ijbc_1N_probe_mixed.csv           1:N probes

The 1:N lists are the protocol CSVs of the IJB release: a header line (``TEMPLATE_ID,SUBJECT_ID,FILENAME,
...``) and one row per image of a template; only the template and subject columns are used (the images
of a template come from ``face_tid_mid``, as in insightface's evaluation). Landmarks are in the pixels of
the loose crop, in the ArcFace template's order (left eye, right eye, nose, left and right mouth corner).

Only the image lists (``name_5pts_score``, ``face_tid_mid``) are always needed. Without a protocol named,
the protocols whose files are present are read and the others recorded in ``IJBMeta.skipped`` with the
missing file (insightface's 1:1 script needs only the pair list); a protocol asked for by name whose file is
missing is an error naming it. Every line is checked; a malformed one raises :class:`IJBMetaError` naming
the file and line number.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = {"ijbb": ("IJBB", ("S1", "S2")), "ijbc": ("IJBC", ("G1", "G2"))}
PROTOCOLS = ("1:1", "1:N")


class IJBMetaError(ValueError):
    """A missing or malformed IJB meta file; the message names the file (and line) and what is wrong."""


@dataclass
class TemplateList:
    """The templates of a 1:N list (each once, in order of first appearance) and their subjects."""

    path: Path
    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IJBMeta:
    """Everything the IJB protocols need except the pixels.

    ``names``/``landmarks``/``faceness``/``templates``/``medias`` have one row per face image (the rows of
    ``face_tid_mid``); ``pairs`` is (t1, t2, label) of the 1:1 protocol (None when not read);
    ``galleries`` (S1, S2 or G1, G2) and ``probes`` are the 1:N lists (empty / None when not read);
    ``skipped`` maps each protocol left out for want of its files to the first missing file.
    """

    dataset: str
    folder: Path
    names: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    galleries: dict[str, TemplateList] = field(default_factory=dict)
    probes: TemplateList | None = None
    skipped: dict[str, Path] = field(default_factory=dict)

    @property
    def image_paths(self) -> list[Path]:
        crops = self.folder / "loose_crop"
        return [crops / name for name in self.names]


def dataset_folder(root: str | Path, dataset: str) -> Path:
    """The folder holding ``loose_crop/`` and ``meta/`` of ``dataset`` (ijbb | ijbc): ``root/IJBC`` of an
    ``IJB_release`` folder, or ``root`` itself when it is that folder."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown IJB dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root)
    looked = []
    for folder in (root / DATASETS[dataset][0], root):
        marker = folder / "meta" / f"{dataset}_face_tid_mid.txt"
        looked.append(str(marker))
        if marker.is_file():
            return folder
    raise IJBMetaError(f"{dataset}: no IJB meta found under {root} (looked for {' and '.join(looked)})")


def meta_paths(folder: Path, dataset: str) -> dict[str, Path]:
    """The meta files of ``dataset`` in ``folder``: landmarks, media, pairs, gallery names, probes."""
    meta = folder / "meta"
    paths = {
        "landmarks": meta / f"{dataset}_name_5pts_score.txt",
        "media": meta / f"{dataset}_face_tid_mid.txt",
        "pairs": meta / f"{dataset}_template_pair_label.txt",
        "probes": meta / f"{dataset}_1N_probe_mixed.csv",
    }
    for name in DATASETS[dataset][1]:
        paths[name] = meta / f"{dataset}_1N_gallery_{name}.csv"
    return paths


def protocol_files(paths: dict[str, Path], dataset: str) -> dict[str, list[Path]]:
    """The meta files each protocol reads (besides the image lists): 1:1 the pairs, 1:N the lists."""
    return {"1:1": [paths["pairs"]], "1:N": [*(paths[g] for g in DATASETS[dataset][1]), paths["probes"]]}


def load_ijb(root: str | Path, dataset: str, protocols: tuple[str, ...] | None = None) -> IJBMeta:
    """Read and cross-check the meta files of ``dataset`` for the ``protocols`` ("1:1", "1:N"); ``None``:
    each protocol whose files are present (the others are recorded in ``skipped``)."""
    folder = dataset_folder(root, dataset)
    paths = meta_paths(folder, dataset)
    skipped: dict[str, Path] = {}
    if protocols is None:
        for protocol, files in protocol_files(paths, dataset).items():
            missing = next((f for f in files if not f.is_file()), None)
            if missing is not None:
                skipped[protocol] = missing
        protocols = tuple(p for p in PROTOCOLS if p not in skipped)
        if not protocols:
            lacking = " and ".join(str(f) for f in skipped.values())
            raise IJBMetaError(f"{folder}: no protocol to run; {lacking} not found")
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols {sorted(unknown) or '(none)'}; choose from {', '.join(PROTOCOLS)}")
    names, landmarks, faceness = read_landmarks(paths["landmarks"])
    media_names, templates, medias = read_template_media(paths["media"])
    if len(media_names) != len(names):
        raise IJBMetaError(
            f"{paths['media']}: {len(media_names)} images, but {paths['landmarks'].name} lists {len(names)}"
        )
    differ = np.flatnonzero(media_names != names)
    if len(differ):
        i = int(differ[0])
        raise IJBMetaError(
            f"{paths['media']}: image {i + 1} is {str(media_names[i])!r}, but image {i + 1} of "
            f"{paths['landmarks'].name} is {str(names[i])!r} (both files must list the images in one order)"
        )
    meta = IJBMeta(dataset, folder, names, landmarks, faceness, templates, medias, skipped=skipped)
    known = np.unique(templates)
    if "1:1" in protocols:
        meta.pairs = read_pairs(paths["pairs"])
        for column in meta.pairs[:2]:
            _check_known(paths["pairs"], column, known)
    if "1:N" in protocols:
        for name in DATASETS[dataset][1]:
            meta.galleries[name] = read_template_list(paths[name])
        meta.probes = read_template_list(paths["probes"])
        for listed in [*meta.galleries.values(), meta.probes]:
            _check_known(listed.path, listed.templates, known)
    return meta


def _check_known(path: Path, listed: np.ndarray, known: np.ndarray) -> None:
    missing = ~np.isin(listed, known)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise IJBMetaError(
            f"{path}: {int(missing.sum())} entries name templates with no image in face_tid_mid "
            f"(the first: template {int(listed[i])}, entry {i + 1})"
        )


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, whitespace-separated fields) of the non-blank lines of ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IJBMetaError(f"{path}: meta file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise IJBMetaError(f"{path}: cannot read: {err}") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise IJBMetaError(f"{path}: empty meta file")
    return rows


def _int(path: Path, line: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise IJBMetaError(f"{path}:{line}: {what} {value!r} is not an integer") from None


def _float(path: Path, line: int, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise IJBMetaError(f"{path}:{line}: {what} {value!r} is not a finite number")
    return number


def _need_fields(path: Path, line: int, fields: list[str], count: int, layout: str) -> None:
    if len(fields) != count:
        raise IJBMetaError(f"{path}:{line}: {len(fields)} fields, expected {count} ({layout})")


def read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``name_5pts_score``: (image names, landmarks (N, 5, 2) float32, faceness scores (N,) float32)."""
    rows = _lines(path)
    names, values = [], np.empty((len(rows), 11), np.float32)
    for i, (line, fields) in enumerate(rows):
        _need_fields(path, line, fields, 12, "image name, 10 landmark coordinates, faceness score")
        names.append(fields[0])
        values[i] = [_float(path, line, v, "landmark coordinate") for v in fields[1:11]] + [
            _float(path, line, fields[11], "faceness score")
        ]
    names = np.array(names)
    _check_unique(path, names, [line for line, _ in rows], "image")
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10].copy()


def read_template_media(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``face_tid_mid``: (image names, template ids, media ids), int64."""
    rows = _lines(path)
    names, ids = [], np.empty((len(rows), 2), np.int64)
    for i, (line, fields) in enumerate(rows):
        _need_fields(path, line, fields, 3, "image name, template id, media id")
        names.append(fields[0])
        ids[i] = _int(path, line, fields[1], "template id"), _int(path, line, fields[2], "media id")
    return np.array(names), ids[:, 0].copy(), ids[:, 1].copy()


def _check_unique(path: Path, names: np.ndarray, lines: list[int], what: str) -> None:
    _, first, counts = np.unique(names, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = str(names[first[counts > 1][0]])
        where = [lines[i] for i in np.flatnonzero(names == dup)[:2]]
        raise IJBMetaError(f"{path}:{where[1]}: {what} {dup!r} is listed again (first at line {where[0]})")


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``template_pair_label``: (t1, t2 int64, label int8 of 0/1).

    IJB-C lists 15.7 M pairs, so the file is parsed by NumPy's C reader; only when that fails is it read
    again line by line to name the first bad line.
    """
    if not path.is_file():
        raise IJBMetaError(f"{path}: meta file not found")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != 3:
        for line, fields in _lines(path):
            _need_fields(path, line, fields, 3, "template id, template id, label")
            for value, what in zip(fields, ("template id", "template id", "label"), strict=True):
                _int(path, line, value, what)
        raise IJBMetaError(f"{path}: not a table of three integer columns (template id, template id, label)")
    if len(table) == 0:
        raise IJBMetaError(f"{path}: empty meta file")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if len(bad):
        line = _data_line_numbers(path)[int(bad[0])]
        raise IJBMetaError(f"{path}:{line}: label {int(table[bad[0], 2])} (must be 0 or 1)")
    return table[:, 0].copy(), table[:, 1].copy(), table[:, 2].astype(np.int8)


def _data_line_numbers(path: Path) -> list[int]:
    return [line for line, _ in _lines(path)]


def read_template_list(path: Path) -> TemplateList:
    """A 1:N protocol CSV: header with ``TEMPLATE_ID`` and ``SUBJECT_ID`` columns, one row per image;
    a template must keep one subject throughout."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise IJBMetaError(f"{path}: 1:N list not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise IJBMetaError(f"{path}: cannot read: {err}") from None
    if not rows:
        raise IJBMetaError(f"{path}: empty 1:N list")
    header = [h.strip().upper() for h in rows[0]]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise IJBMetaError(
            f"{path}:1: header {','.join(rows[0])!r} lacks TEMPLATE_ID and SUBJECT_ID columns "
            "(expected TEMPLATE_ID,SUBJECT_ID,FILENAME,...)"
        )
    t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    subject_of: dict[int, tuple[int, int]] = {}  # template -> (subject, line of first row)
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise IJBMetaError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
        template = _int(path, line, row[t_col].strip(), "TEMPLATE_ID")
        subject = _int(path, line, row[s_col].strip(), "SUBJECT_ID")
        first = subject_of.setdefault(template, (subject, line))
        if first[0] != subject:
            raise IJBMetaError(
                f"{path}:{line}: template {template} has subject {subject}, but {first[0]} at line {first[1]}"
            )
    if not subject_of:
        raise IJBMetaError(f"{path}: no templates listed")
    templates = np.fromiter(subject_of, np.int64, len(subject_of))
    subjects = np.array([subject_of[t][0] for t in templates.tolist()], np.int64)
    return TemplateList(path, templates, subjects)
