"""Train a face-recognition model from a YAML config.

    python train.py --config configs/ms1mv2_r100_arcface.yaml [--set key=value ...] [--dry-run]

``--dry-run`` builds everything the config names (backbone, training data, loader), runs two
forward/backward passes of the backbone on real batches and prints the model size, the number of classes
and images, and the resolved config. The margin heads and the distributed training loop are assembled here
once ``heads/`` and ``losses/`` provide them; until then a run without ``--dry-run`` stops with a message.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from backbones import build_backbone
from core.config import Config, ConfigError, config_to_dict, load_config
from data.builder import build_train_dataset
from data.transforms import normalize_batch


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML experiment file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--dry-run", action="store_true", help="build everything, run 2 steps, report")
    return parser.parse_args(argv)


def build_model(cfg: Config) -> nn.Module:
    return build_backbone(
        cfg.model.backbone,
        embedding_size=cfg.model.embedding_size,
        dropout=cfg.model.dropout,
        precision=cfg.model.precision,
        grad_checkpoint=cfg.model.grad_checkpoint,
    )


def dry_run(cfg: Config, steps: int = 2) -> dict[str, object]:
    """Build the model and the data, run ``steps`` forward/backward passes, return what was seen."""
    torch.manual_seed(cfg.experiment.seed)
    dataset = build_train_dataset(cfg.data, seed=cfg.experiment.seed)
    model = build_model(cfg)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        drop_last=False,
    )
    model.train()
    seen = 0
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            break
        x = normalize_batch(images, color=cfg.data.color)
        embeddings = model(x)
        # Without a head, the squared embedding norm stands in for a loss to exercise backward.
        embeddings.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        seen += labels.numel()
    elapsed = time.perf_counter() - start
    return {
        "backbone": cfg.model.backbone,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "embedding": list(embeddings.shape),
        "classes": dataset.num_identities,
        "images": dataset.num_images,
        "steps": min(steps, len(loader)),
        "images_per_s": round(seen / elapsed, 1) if elapsed > 0 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(
            "train.py: the training loop needs the margin heads and losses, which this build does not "
            "have yet; run with --dry-run to check the config, model and data.",
            file=sys.stderr,
        )
        return 2
    report = dry_run(cfg)
    print(f"config: {args.config}")
    for section, values in config_to_dict(cfg).items():
        print(f"  {section}: {values}")
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
