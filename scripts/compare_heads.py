"""Margin heads compared on real faces: the same backbone, data, schedule and budget for each head.

Trains ``configs/demo_cpu.yaml`` (CelebA identities, prepared as ``make demo`` prepares them) once per head
and seed through ``train.py``, evaluates every run on the 6,000 LFW pairs (people not in the training
data, 10-fold protocol) and prints a table of accuracy per head (mean ± std over seeds), writes it as JSON
and Markdown, and plots the accuracies and the learning curves.

    python -m scripts.compare_heads --seeds 0 1 --set train.epochs=4
    python -m scripts.compare_heads --heads arcface cosface --out work_dirs/heads

Every head runs with the scale s of the demo (32: a few hundred classes) and its own published margin;
FRABSM adds its mining-weight loss as in its recipe. A finished run is not trained again (its checkpoint
holds the result), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import load_checkpoint
from core.fileio import atomic_write, write_json
from core.logbook import read_scalars
from core.paths import PROJECT_ROOT, shared_data_dir
from scripts.demo import CURVES, plot_learning_curves, prepare_training_rec, prepare_validation

# Per head: the train.py overrides that turn the demo's ArcFace into that method (s 32 for all).
HEADS: dict[str, list[str]] = {
    "softmax": ["head.name=softmax", "head.params={s: 32.0}"],
    "arcface": ["head.name=arcface", "head.params={s: 32.0, m: 0.5}"],
    "cosface": ["head.name=cosface", "head.params={s: 32.0, m: 0.35}"],
    "adaface": ["head.name=adaface", "head.params={s: 32.0, m: 0.4, h: 0.333}"],
    "frabsm": [
        "head.name=frabsm",
        "head.params={s: 32.0, m: 0.4, h: 0.333, add_scale: 0.7}",
        "loss.name=frabsm_weight",
        "loss.params={alpha: 1.0, p0: 0.6, reduction: batch}",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir(), help="real face data folder")
    parser.add_argument("--prepared", type=Path, default=PROJECT_ROOT / "work_dirs" / "demo",
                        help="where make demo keeps (or makes) the packed CelebA and LFW .bin")  # fmt: skip
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work_dirs" / "heads")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "demo_cpu.yaml")
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="overrides for every run")
    return parser.parse_args(argv)


def run_one(config: Path, settings: list[str], run_dir: Path) -> dict[str, Any]:
    """Train (or continue) one run and return its final LFW result and steps."""
    import train

    status = train.main(["--config", str(config), "--set", *settings, "--resume", "auto"])
    if status != 0:
        raise SystemExit(f"compare_heads: the run in {run_dir} failed (exit {status})")
    state = load_checkpoint(run_dir / "last.pt")
    if "lfw" not in state["validation"]:
        raise SystemExit(f"compare_heads: {run_dir / 'last.pt'} holds no LFW result (train.val_every?)")
    return {"step": state["step"], **state["validation"]["lfw"]}


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for head, by_seed in results.items():
        accuracies = np.array([r["accuracy"] for r in by_seed.values()])
        rows.append({
            "head": head,
            "seeds": sorted(by_seed),
            "accuracy_mean": float(accuracies.mean()),
            "accuracy_std_over_seeds": float(accuracies.std()),
            "per_seed": {seed: r["accuracy"] for seed, r in by_seed.items()},
            "fold_std_mean": float(np.mean([r["accuracy_std"] for r in by_seed.values()])),
            "val_at_far_1e-3": float(np.mean([r["val_at_far_1e-3"] for r in by_seed.values()])),
            "steps": next(iter(by_seed.values()))["step"],
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| head | LFW accuracy (mean of seeds) | std over seeds | per seed | 10-fold std | VAL@FAR=1e-3 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{s}: {a * 100:.2f}" for s, a in r["per_seed"].items())
        lines.append(
            f"| {r['head']} | {r['accuracy_mean'] * 100:.2f}% | {r['accuracy_std_over_seeds'] * 100:.2f} "
            f"| {seeds} | {r['fold_std_mean'] * 100:.2f} | {r['val_at_far_1e-3'] * 100:.2f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    def bars(ax) -> None:
        ax.bar([r["head"] for r in rows], [r["accuracy_mean"] * 100 for r in rows],
               yerr=[r["accuracy_std_over_seeds"] * 100 for r in rows], capsize=4)  # fmt: skip
        ax.set_ylim(max(50.0, min(r["accuracy_mean"] for r in rows) * 100 - 5), 100)
        ax.set(ylabel="LFW 10-fold accuracy (%)", title="final accuracy (mean ± std over seeds)")

    plot_learning_curves(curves, path, bars)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rec = prepare_training_rec(args.data / "celeba_aligned112", args.prepared / "celeba")
    photos, pairs = args.data / "lfw_color150", args.data / "lfw_pairs.txt"
    val_root = prepare_validation(photos, pairs, args.prepared / "lfw")
    results: dict[str, dict[int, dict[str, Any]]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for head in args.heads:
        for seed in args.seeds:
            run_dir = args.out / f"{head}_seed{seed}"
            settings = [f"data.root={rec}", f"data.val_root={val_root}", f"output_dir={run_dir}",
                        f"experiment.seed={seed}", *HEADS[head], *args.set]  # fmt: skip
            print(f"== {head}, seed {seed}: {run_dir}")
            results.setdefault(head, {})[seed] = run_one(args.config, settings, run_dir)
            curves[f"{head} s{seed}"] = read_scalars(run_dir, CURVES)
    rows = summarise(results)
    table = markdown_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "heads.json",
        {"config": str(args.config), "overrides": args.set, "rows": rows, "curves": curves},
    )
    with atomic_write(args.out / "heads.md", "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    plot(rows, curves, args.out / "heads.png")
    print(f"table {args.out / 'heads.md'}, JSON {args.out / 'heads.json'}, plot {args.out / 'heads.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
