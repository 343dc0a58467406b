"""Evaluate a model on verification ``.bin`` sets with the 10-fold protocol (docs/methods.md §5.2).

    python -m validation_hq.evaluate --model CKPT_OR_ONNX --bins lfw.bin cfp_fp.bin [--json out.json]
    python -m validation_hq.evaluate --model model.pt --backbone r100 --bin-dir /data/faces_emore \
        --precision bf16 --workers 8

Prints one row per set (accuracy and its std over the 10 folds, VAL at FAR=1e-3, mean feature norm) and
the mean accuracy, with the switches that produced them (colour order, flip fusion, batch size).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from core.embedders import add_embedder_arguments, embedder_from_args, embedder_key
from core.extract import extract
from core.fileio import atomic_write
from data.verification import VerificationFileError, load_bin
from validation_hq.protocol import FUSIONS, evaluate_pairs, fuse_flip

SETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


def cached_features(
    embed, val, batch_size: int, cache: Path | None, key: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features of a set and of its flips, read from ``cache/<set>__<key>.npz`` when an earlier run wrote
    them for the same model file (so re-scoring, e.g. with another fusion, needs no model)."""
    path = cache / f"{val.name}__{key}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            if saved["original"].shape[0] == len(val.images):
                return saved["original"], saved["flipped"]
    original, flipped = extract(embed, val.images, batch_size, flip=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as fh:
            np.savez(fh, original=original, flipped=flipped)
    return original, flipped


def evaluate_bins(
    embed, bins: Sequence[Path], fusion: str = "sum", batch_size: int = 128, cache: Path | None = None,
    key: str = "", workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Protocol results per set (and their mean accuracy) for an embedder of uint8 RGB batches; with
    ``cache``, features are stored and reused under ``key`` (which must name the model). ``workers``
    threads decode each ``.bin``."""
    results: dict[str, Any] = {}
    for path in bins:
        val = load_bin(path, workers=workers)
        original, flipped = cached_features(embed, val, batch_size, cache, key)
        results[val.name] = score(original, flipped, val.issame, fusion)
    results["mean_accuracy"] = float(np.mean([r["accuracy"] for r in results.values()]))
    return results


def score(original: np.ndarray, flipped: np.ndarray | None, issame: np.ndarray, fusion: str = "sum") -> dict:
    """The reported numbers of one set from its features (training-time validation uses the same)."""
    metrics = evaluate_pairs(fuse_flip(original, flipped, fusion), issame)
    return {
        "pairs": len(issame),
        "accuracy": metrics["accuracy"],
        "accuracy_std": metrics["accuracy_std"],
        "val_at_far_1e-3": metrics["val"],
        "far": metrics["far"],
        "feature_norm": float(np.linalg.norm(original, axis=1).mean()),
    }


def format_table(results: dict[str, Any]) -> str:
    sets = {name: r for name, r in results.items() if isinstance(r, dict) and "accuracy" in r}
    w = max(10, *(len(name) for name in sets))
    rows = [f"{'set':<{w}} {'pairs':>6} {'accuracy':>16} {'VAL@1e-3':>9} {'norm':>7}"]
    for name, r in sets.items():
        accuracy = f"{r['accuracy'] * 100:.2f} ± {r['accuracy_std'] * 100:.2f}"
        rows.append(f"{name:<{w}} {r['pairs']:>6} {accuracy:>16} {r['val_at_far_1e-3'] * 100:>8.2f}% "
                    f"{r['feature_norm']:>7.2f}")  # fmt: skip
    rows.append(f"{'mean':<{w}} {'':>6} {results['mean_accuracy'] * 100:>14.2f}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_embedder_arguments(parser)
    parser.add_argument("--bins", nargs="*", type=Path, default=[], help=".bin files")
    parser.add_argument("--bin-dir", type=Path, help=f"folder holding any of {', '.join(SETS)} (.bin)")
    parser.add_argument("--fusion", choices=FUSIONS, default="sum", help="flip fusion (none: no flip)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4, help="threads decoding each .bin (default 4)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cache", type=Path, help="folder for features (.npz), reused by later runs")
    return parser


@main_guard("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bins = list(args.bins)
    if args.bin_dir:
        bins += [args.bin_dir / f"{s}.bin" for s in SETS if (args.bin_dir / f"{s}.bin").is_file()]
    if not bins:
        print("evaluate: no .bin given (--bins, or --bin-dir with lfw.bin, cfp_fp.bin, ...)", file=sys.stderr)
        return 2
    if args.json:
        check_writable(args.json)  # before the features are extracted, not after
    try:
        embed = embedder_from_args(args)
        key = embedder_key(args.model, embed)
        results = evaluate_bins(embed, bins, args.fusion, args.batch_size, args.cache, key, args.workers)
    except (OSError, ValueError, VerificationFileError) as err:
        print(f"evaluate: {error_line(err)}", file=sys.stderr)
        return 2
    results["settings"] = {"model": str(args.model), "color": embed.color, "fusion": args.fusion,
                           "batch_size": args.batch_size, "normalization": embed.normalization,
                           "precision": embed.precision}  # fmt: skip
    print(
        f"model {args.model}: {embed.color.upper()} input, flip fusion {args.fusion}, batch {args.batch_size}"
        f", {embed.precision}"
    )
    print(format_table(results))
    if args.json:
        with atomic_write(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
