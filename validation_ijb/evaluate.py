r"""Evaluate a model on IJB-B / IJB-C (insightface ``IJB_release`` layout): 1:1 verification (TAR at FAR
1e-6 ... 1e-1) and 1:N identification (rank-1/5/10, TPIR at FPIR 0.01 / 0.1), docs/methods.md §5.3.

    python -m validation_ijb.evaluate --model CKPT_OR_ONNX --data-root /data/IJB_release --dataset ijbc
    python -m validation_ijb.evaluate --model model.pt --backbone r100 --data-root IJB_release \
        --dataset ijbb --norm-score 0 1 --detector-score 0 1 --cache work_dirs/eval/cache
    python -m validation_ijb.evaluate --model work_dirs/eval/cache/ijbc__MODEL.npz --data-root IJB_release \
        --dataset ijbc --modes N1D0F1 N0D1F1          # re-score saved features, no model needed

Each face is aligned from its 5 landmarks to the 112x112 ArcFace template (black border) in ``--workers``
loader processes and embedded with its horizontal flip. The N/D/F switches (norm score, detector score,
flip; see ``validation_ijb.protocol``) are printed beside every result; each of ``--norm-score``,
``--detector-score`` and ``--flip`` takes 0, 1 or both, and every combination is scored from the same
features (or list them with ``--modes``). With ``--cache DIR`` the per-image features (original and
flipped) are saved to ``DIR/<dataset>__<model>.npz`` and reused; such a file can later be passed as
``--model`` to re-score without the model. ``--out DIR`` writes the table (.txt), the results (.json)
and the ROC curves (.png).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.cli import check_writable, error_line, main_guard
from core.fileio import atomic_write, write_json
from evaluation.cache import FeatureCache, read_features, write_features
from evaluation.embedders import embedder_key
from evaluation.extract import extract_dataset
from evaluation.options import (
    add_batch_arguments,
    add_cache_argument,
    add_data_root_argument,
    add_embedder_arguments,
    embedder_from_args,
    run_settings,
)
from evaluation.verification import FARS
from validation_ijb.dataset import AlignedFaces
from validation_ijb.meta import DATASETS, PROTOCOLS, IJBMeta, load_ijb
from validation_ijb.protocol import (
    FPIRS,
    RANKS,
    Mode,
    identification,
    image_features,
    pair_scores,
    template_features,
    verification,
)

Embedder = Callable[[torch.Tensor], torch.Tensor]
ALIGNMENT = "5-point similarity to the ArcFace 112x112 template, bilinear, black border"


# ----------------------------------------------------------------------------------------- features


def extract_features(
    embed: Embedder, meta: IJBMeta, batch_size: int = 128, workers: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float32 of every face image of ``meta`` and of its horizontal flip, in the rows of
    ``face_tid_mid`` (decoding and alignment in ``workers`` loader processes)."""
    faces = AlignedFaces(meta.image_paths, meta.landmarks)
    original, flipped = extract_dataset(embed, faces, batch_size, True, workers, f"{meta.dataset} images")
    assert flipped is not None
    return original, flipped


def _recorded(meta: IJBMeta) -> dict[str, np.ndarray]:
    """What a features file records of the images it was computed from: their names and landmarks."""
    return {"names": meta.names, "landmarks": meta.landmarks}


def save_features(path: Path, meta: IJBMeta, original: np.ndarray, flipped: np.ndarray) -> None:
    """Write the features with the image names and landmarks they were computed from (atomically)."""
    write_features(path, original, flipped, _recorded(meta), notes={"dataset": meta.dataset})


def load_features(path: Path, meta: IJBMeta) -> tuple[np.ndarray, np.ndarray]:
    """Features saved by :func:`save_features`; an error if they were computed for other images or
    landmarks than ``meta``'s."""
    original, flipped = read_features(path, len(meta.names), True, _recorded(meta), _source(meta))
    assert flipped is not None
    return original, flipped


def _source(meta: IJBMeta) -> str:
    return f"{meta.dataset} in {meta.folder}"


def cached_features(
    embed: Embedder, meta: IJBMeta, batch_size: int, workers: int, cache: Path | None, key: str
) -> tuple[np.ndarray, np.ndarray, Path | None]:
    """(original, flipped, cache file or None): read from ``cache/<dataset>__<key>.npz`` when an earlier
    run saved them for the same images and landmarks, else extracted (and saved there with ``cache``)."""
    store = FeatureCache(cache)
    stem = f"{meta.dataset}__{key}"
    original, flipped = store.features(
        stem, lambda: extract_features(embed, meta, batch_size, workers), rows=len(meta.names),
        recorded=_recorded(meta), notes={"dataset": meta.dataset}, source=_source(meta),
    )  # fmt: skip
    assert flipped is not None
    return original, flipped, store.path(stem)


# -------------------------------------------------------------------------------------------- scoring


def evaluate_features(
    meta: IJBMeta,
    original: np.ndarray,
    flipped: np.ndarray | None,
    modes: Sequence[Mode] = (Mode(),),
    weights: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Results per mode name (``"N1D1F1"``...) of the protocols ``meta`` was read for. ``weights``: optional
    per-image factors for the template pooling (:func:`validation_ijb.protocol.template_features`)."""
    if len(original) != len(meta.names):
        raise ValueError(f"{len(original)} features for the {len(meta.names)} images of {meta.dataset}")
    results = {}
    for mode in modes:
        feats = image_features(original, flipped, meta.faceness, mode)
        ids, template_feats = template_features(feats, meta.templates, meta.medias, weights)
        entry: dict[str, Any] = {
            "switches": {"norm_score": int(mode.norm_score), "detector_score": int(mode.detector_score),
                         "flip": int(mode.flip)},
        }  # fmt: skip
        if meta.pairs is not None:
            t1, t2, labels = meta.pairs
            entry["1:1"] = verification(pair_scores(ids, template_feats, t1, t2), labels)
        if meta.probes is not None:
            entry["1:N"] = identification(ids, template_feats, meta.galleries, meta.probes)
        results[mode.name] = entry
    return results


def evaluate_ijb(
    embed: Embedder,
    root: str | Path,
    dataset: str = "ijbc",
    modes: Sequence[Mode] = (Mode(),),
    protocols: Sequence[str] | None = None,
    batch_size: int = 128,
    workers: int = 4,
    cache: Path | None = None,
    key: str = "model",
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """Evaluate an embedder (uint8 RGB batch -> features) on IJB-B/C under each N/D/F ``mode``, for the
    ``protocols`` ("1:1", "1:N"; default: those whose files are present, the others listed under
    ``skipped``); with ``cache``, features are saved and reused under ``key`` (which must name the model)."""
    meta = load_ijb(root, dataset, None if protocols is None else tuple(protocols))
    original, flipped, _ = cached_features(embed, meta, batch_size, workers, cache, key)
    return {**describe(meta), "modes": evaluate_features(meta, original, flipped, modes, weights)}


def describe(meta: IJBMeta) -> dict[str, Any]:
    """Counts of the protocol files, reported beside the results (``format_table`` reads them)."""
    info: dict[str, Any] = {"dataset": meta.dataset, "folder": str(meta.folder), "images": len(meta.names),
                            "templates": len(np.unique(meta.templates))}  # fmt: skip
    if meta.pairs is not None:
        info["pairs"], info["genuine_pairs"] = len(meta.pairs[2]), int(meta.pairs[2].sum())
    if meta.probes is not None:
        info["galleries"] = {name: len(g.templates) for name, g in meta.galleries.items()}
        info["probes"] = len(meta.probes.templates)
    if meta.skipped:
        info["skipped"] = {protocol: f"{path} not found" for protocol, path in meta.skipped.items()}
    return info


# ------------------------------------------------------------------------------------------ reporting


def format_table(results: dict[str, Any]) -> str:
    """The 1:1 and 1:N tables, one row per mode, with the switches spelled out."""
    modes = results["modes"]
    lines = []
    name = DATASETS[results["dataset"]][0]
    head = f"{'mode':<7} {'norm':>4} {'det':>3} {'flip':>4}"

    def switches(mode: dict) -> str:
        s = mode["switches"]
        return f"{s['norm_score']:>4} {s['detector_score']:>3} {s['flip']:>4}"

    if any("1:1" in m for m in modes.values()):
        pairs, genuine = results["pairs"], results["genuine_pairs"]
        lines.append(f"{name} 1:1 verification: {pairs} template pairs ({genuine} genuine), TAR (%) at FAR")
        lines.append(head + "".join(f"{far:>8.0e}" for far in FARS))
        for mode_name, mode in modes.items():
            tar = mode["1:1"]["tar_at_far"]
            lines.append(f"{mode_name:<7} {switches(mode)}" + "".join(f"{tar[f] * 100:>8.2f}" for f in FARS))
    if any("1:N" in m for m in modes.values()):
        galleries = results["galleries"]
        lines.append(
            f"{name} 1:N identification: gallery {' ∪ '.join(galleries)} ({sum(galleries.values())} "
            f"templates), {results['probes']} mixed probes; rank (%), TPIR (%) at FPIR"
        )
        open_cols = "".join(f" {g}@{f:g}".rjust(9) for g in galleries for f in FPIRS)
        lines.append(head + "".join(f"{'rank-' + str(k):>8}" for k in RANKS)
                     + "".join(f"{'FPIR=' + format(f, 'g'):>10}" for f in FPIRS)
                     + "  | open-set" + open_cols)  # fmt: skip
        for mode_name, mode in modes.items():
            one_n = mode["1:N"]
            row = f"{mode_name:<7} {switches(mode)}"
            row += "".join(f"{one_n['rank'][k] * 100:>8.2f}" for k in RANKS)
            row += "".join(f"{one_n['tpir_at_fpir'][f]['tpir'] * 100:>10.2f}" for f in FPIRS) + "  |         "
            for g in galleries:
                tpir = one_n["open_set"][g].get("tpir_at_fpir")
                row += "".join(f"{tpir[f]['tpir'] * 100:>9.2f}" if tpir else f"{'n/a':>9}" for f in FPIRS)
            lines.append(row)
        lines.append(
            "TPIR at FPIR: insightface's figure (threshold from non-mate scores of the union gallery);"
            " open-set: NIST definition per gallery (threshold from probes of subjects outside it)"
        )
    return "\n".join(lines)


def plot_roc(results: dict[str, Any], path: Path, title: str) -> Path:
    """The 1:1 ROC of every mode (log FAR axis) to a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for mode_name, mode in results["modes"].items():
        roc = mode["1:1"]
        ax.plot(roc["fpr"], roc["tpr"], lw=1.2,
                label=f"{mode_name} (TAR@1e-4 = {roc['tar_at_far'][1e-4] * 100:.2f}%)")  # fmt: skip
    ax.set(xscale="log", xlim=(1e-6, 1), ylim=(0, 1.01), xlabel="False accept rate",
           ylabel="True accept rate", title=title)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    return path


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the ROC arrays (kept for the plot), with string keys."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if k not in ("fpr", "tpr")}
        return value

    return clean(results)


# ---------------------------------------------------------------------------------------------- CLI


def parse_modes(args: argparse.Namespace) -> list[Mode]:
    if args.modes:
        return [Mode.parse(m) for m in args.modes]
    combos = itertools.product(args.norm_score, args.detector_score, args.flip)
    return list(dict.fromkeys(Mode(bool(n), bool(d), bool(f)) for n, d, f in combos))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_embedder_arguments(parser)
    add_data_root_argument(parser, "--ijb-root", "--image-path",
                           help="IJB_release folder (with IJBB/, IJBC/), or its IJBB/ or IJBC/")  # fmt: skip
    parser.add_argument("--dataset", "--dataset_name", type=str.lower, choices=list(DATASETS), default="ijbc",
                        help="ijbc or ijbb (AdaFace's IJBC, IJBB too)")  # fmt: skip
    switch = {"nargs": "+", "type": int, "choices": (0, 1), "default": [1]}
    parser.add_argument("--norm-score", **switch, help="N: 1 keeps the feature norm, 0 normalises")
    parser.add_argument("--detector-score", **switch, help="D: 1 weights by the faceness score")
    parser.add_argument("--flip", **switch, help="F: 1 adds the flipped image's feature")
    parser.add_argument("--modes", nargs="+", help="explicit modes instead, e.g. N1D1F1 N1D0F1 N0D1F1")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS,
                        help="default: each one whose meta files are present")  # fmt: skip
    parser.add_argument("--weights", type=Path, help="per-image pooling weights (.npy, rows of face_tid_mid)")
    add_batch_arguments(parser, 128, 4, "loader processes decoding and aligning")
    parser.add_argument("--out", "--result-dir", type=Path,
                        help="folder for the table (.txt), results (.json), ROC (.png)")  # fmt: skip
    add_cache_argument(parser, help="folder for the per-image features (.npz), reused later")
    return parser


@main_guard("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        check_writable(args.out / f"{args.dataset}_{args.model.stem}.json")  # before the features, not after
    try:
        modes = parse_modes(args)
        meta = load_ijb(args.data_root, args.dataset, tuple(args.protocols) if args.protocols else None)
        for protocol, path in meta.skipped.items():
            print(f"evaluate: skipping {protocol}: {path} not found", file=sys.stderr)
        weights = np.load(args.weights) if args.weights else None
        start = time.perf_counter()
        if args.model.suffix == ".npz":  # features saved by an earlier run
            original, flipped = load_features(args.model, meta)
            about, cache_file = f"features {args.model}", args.model
        else:
            embed = embedder_from_args(args)
            key = embedder_key(args.model, embed)
            original, flipped, cache_file = cached_features(
                embed, meta, args.batch_size, args.workers, args.cache, key
            )
            about = f"model {args.model} ({embed.color.upper()} input, {embed.precision})"
        seconds = time.perf_counter() - start
        results = {**describe(meta), "modes": evaluate_features(meta, original, flipped, modes, weights)}
    except (OSError, ValueError) as err:  # missing/unreadable files, bad meta lines, corrupt images
        print(f"evaluate: {error_line(err)}", file=sys.stderr)
        return 2
    results["settings"] = run_settings(
        args, None if args.model.suffix == ".npz" else embed,
        features=str(cache_file) if cache_file else None, alignment=ALIGNMENT,
        weights=str(args.weights) if args.weights else None, feature_seconds=round(seconds, 3),
    )  # fmt: skip
    table = format_table(results)
    print(f"{DATASETS[args.dataset][0]}: {about}, {len(meta.names)} images in {seconds:.1f} s; {ALIGNMENT}")
    print(table)
    if args.out:
        stem = f"{args.dataset}_{args.model.stem}"
        with atomic_write(args.out / f"{stem}.txt", "w", encoding="utf-8") as fh:
            fh.write(f"{about}\n{table}\n")
        write_json(args.out / f"{stem}.json", to_json(results))
        if meta.pairs is not None:
            title = f"{DATASETS[args.dataset][0]} 1:1 ROC, {args.model.name}"
            plot_roc(results, args.out / f"{stem}_roc.png", title)
        print(f"wrote {args.out / stem}.{{txt,json}}" + (" and _roc.png" if meta.pairs is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
