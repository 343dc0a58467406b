"""Evaluate a model on verification ``.bin`` sets with the 10-fold protocol (docs/methods.md §5.2).

    python -m validation_hq.evaluate --model CKPT_OR_ONNX --bins lfw.bin cfp_fp.bin [--json out.json]
    python -m validation_hq.evaluate --model model.pt --backbone r100 --data-root /data/faces_emore \
        --precision bf16 --workers 8

Prints one row per set (accuracy and its std over the 10 folds, VAL at FAR=1e-3, mean feature norm) and
the mean accuracy, with the switches that produced them (colour order, flip fusion, batch size).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.cli import check_writable, error_line, main_guard
from core.fileio import write_json
from data.verification import VerificationFileError, load_bin
from evaluation.cache import FeatureCache
from evaluation.embedders import embedder_key
from evaluation.extract import extract
from evaluation.options import (
    add_batch_arguments,
    add_cache_argument,
    add_data_root_argument,
    add_embedder_arguments,
    add_fusion_argument,
    embedder_from_args,
    run_settings,
    settings_line,
)
from evaluation.verification import verification_results

SETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


def evaluate_bins(
    embed, bins: Sequence[Path], fusion: str = "sum", batch_size: int = 128, cache: Path | None = None,
    key: str = "", workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Protocol results per set (and their mean accuracy) for an embedder of uint8 RGB batches; with
    ``cache``, the features of each set and of its flips are stored as ``cache/<set>__<key>.npz`` and
    reused (``key`` must name the model; a re-scoring, e.g. with another fusion, needs no model).
    ``workers`` threads decode each ``.bin``."""
    store = FeatureCache(cache)
    results: dict[str, Any] = {}
    for path in bins:
        val = load_bin(path, workers=workers)
        original, flipped = store.features(
            f"{val.name}__{key}", lambda val=val: extract(embed, val.images, batch_size, flip=True),
            rows=len(val.images), source=f"{val.name} ({path})",
        )  # fmt: skip
        results[val.name] = verification_results(original, flipped, val.issame, fusion)
    results["mean_accuracy"] = float(np.mean([r["accuracy"] for r in results.values()]))
    return results


# The reported numbers of one set from its features; train.py's validation imports this name.
score = verification_results


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
    parser.add_argument("--bins", "--bin", nargs="*", type=Path, default=[], help=".bin files")
    add_data_root_argument(parser, "--bin-dir", required=False,
                           help=f"folder holding any of {', '.join(SETS)} (.bin)")  # fmt: skip
    add_fusion_argument(parser)
    add_batch_arguments(parser, 128, 4, "threads decoding each .bin")
    parser.add_argument("--json", type=Path, help="write the results here")
    add_cache_argument(parser, help="folder for features (.npz), reused by later runs")
    return parser


@main_guard("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bins = list(args.bins)
    if args.data_root:
        bins += [args.data_root / f"{s}.bin" for s in SETS if (args.data_root / f"{s}.bin").is_file()]
    if not bins:
        print(
            "evaluate: no .bin given (--bins, or --data-root with lfw.bin, cfp_fp.bin, ...)", file=sys.stderr
        )
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
    results["settings"] = run_settings(args, embed)
    print(settings_line(results["settings"]))
    print(format_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
