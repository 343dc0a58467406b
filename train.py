"""Train a face-recognition model from a YAML config, on one process or under torchrun.

    python train.py --config configs/cpu_tiny.yaml --set data.root=PATH output_dir=DIR
    torchrun --nproc_per_node=8 train.py --config configs/recipes/arcface.yaml --set data.root=/data/ms1mv2
    python train.py --config ... --resume auto          # continue DIR/last.pt (fresh start if none)
    python train.py --config ... --overwrite            # a new run in DIR: the old run's files set aside
    python train.py --config ... --dry-run              # build everything, run 2 steps, report

The backbone is wrapped in DDP (gradients summed over ranks, see ``core.distributed``); the classifier is
Partial FC over any registered margin head, its class centres sharded across ranks; the loss is a function
of the per-sample cross-entropy (``losses``). With ``head.name: none`` there is no classifier: the loss is
computed on the embeddings of PK batches (``data.sampler: pk``; ``loss.name: triplet`` with online mining,
or ``probface``, which trains an uncertainty module on a frozen pretrained backbone). One optimizer step
consumes one global batch of ``data.batch_size x processes x optim.grad_accum`` images in the order of
``data.sampler``, so a run resumes mid-epoch, and on another number of processes with the same global
batch, exactly where it stopped. ``output_dir`` receives config.yaml, train.log, tensorboard/, step_N.pt,
last.pt and best.pt; a new run into a folder that holds another run's checkpoints is refused, and every
check (config, data, the checkpoint to resume and its fit with this run) happens before the first write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbones import BACKBONES, build_backbone
from core.checkpoint import (
    NORMALIZATION,
    STEP_FILE,
    CheckpointError,
    load_checkpoint,
    nonfinite_entry,
    numbered_checkpoints,
    resolve_resume,
    save_step_checkpoint,
)
from core.config import (
    Config,
    ConfigError,
    check_part,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from core.distributed import (
    FAULT_EXIT_STATUS,
    CollectiveError,
    any_rank,
    barrier,
    collective_error,
    get_rank,
    get_world_size,
    init_distributed,
    register_sum_hook,
    shutdown_distributed,
)
from core.embedders import TorchEmbedder
from core.extract import extract
from core.fileio import describe_os_error, remove_stale_temp_files
from core.logbook import Logbook
from core.optim import build_optimizer, build_scheduler
from core.registry import UnknownNameError
from data import image_folder, recordio
from data.bad_records import BadRecordError
from data.builder import build_train_dataset
from data.decode import DecodeError
from data.sampler import GlobalBatchSampler, KeyedFaceDataset, PKBatchSampler
from data.transforms import FaceDataset, normalize_batch
from data.verification import VerificationFileError, VerificationSet, load_bin
from heads.partial_fc import PartialFC
from heads.registry import HEADS
from losses import LOSSES
from losses.softmax_losses import inverse_log_frequency_weights
from mining import DifficultyScores
from mining.closeness_diversity import ClosenessDiversityMiner, MinedTerms, is_mining_step
from probface.loss import ProbFaceLoss  # registers loss "probface"
from probface.model import ProbFaceNet, UncertaintyModule, conv_final_size, has_feature_output
from validation_hq.evaluate import score


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, or its input is unusable); the message says where and why."""


# Errors about the user's input (config, data, checkpoint): reported in one line, without a traceback.
INPUT_ERRORS = (
    ConfigError, CheckpointError, TrainingError, UnknownNameError, FileNotFoundError, DecodeError,
    recordio.RecordIOError, recordio.FolderLayoutError, image_folder.FolderLayoutError, VerificationFileError,
    BadRecordError,
)  # fmt: skip


@dataclasses.dataclass
class Run:
    """Everything a training run holds, built once by :func:`build`."""

    cfg: Config
    device: torch.device
    out: Path
    dataset: KeyedFaceDataset
    sampler: GlobalBatchSampler
    backbone: nn.Module  # the bare backbone (what checkpoints hold)
    model: nn.Module  # the backbone (with the uncertainty module) as trained: DDP and/or compiled
    classifier: PartialFC | None  # None with head.name none (the loss is on the embeddings)
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    val_paths: list[Path]
    total_steps: int
    num_classes: int
    uncertainty: UncertaintyModule | None = None  # ProbFace (model.uncertainty)
    difficulty: DifficultyScores | None = None  # per-image EMA target cosine (mining.difficulty)
    miner: ClosenessDiversityMiner | None = None  # closeness-diversity stage 2 (mining.cd_interval)
    mined: MinedTerms | None = None  # the last mined batch's terms
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    best: float = -math.inf
    bad_steps: int = 0  # non-finite losses in a row
    finite_embeddings: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per micro-batch
    skipped_steps: int = 0
    last_checkpoint: Path | None = None
    val_sets: list[VerificationSet] = dataclasses.field(default_factory=list)  # decoded by fit()
    validation: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # the latest results


# ------------------------------------------------------------------------------------------- build


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML experiment file")
    parser.add_argument(
        "--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="dotted overrides"
    )
    parser.add_argument("--resume", default="", metavar="PATH|auto", help="checkpoint to continue from")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start in an output_dir that holds another run's checkpoints: its files are moved to "
        "output_dir/replaced_<date-time>/ first (nothing is deleted)",
    )
    parser.add_argument("--dry-run", action="store_true", help="build everything, run 2 steps, report")
    return parser.parse_args(argv)


def build_model(cfg: Config) -> nn.Module:
    return build_backbone(
        cfg.model.backbone,
        embedding_size=cfg.model.embedding_size,
        dropout=cfg.model.dropout,
        precision=cfg.model.precision,
        grad_checkpoint=cfg.model.grad_checkpoint,
        input_size=cfg.model.input_size or cfg.data.image_size,
    )


def check_parts(cfg: Config) -> None:
    """The backbone, head and loss the config names are registered and take its ``head.params`` and
    ``loss.params`` (names, and values by their annotations), checked before anything is built."""
    check_part(cfg, BACKBONES, "model.backbone")
    if cfg.head.name != "none":
        check_part(cfg, HEADS, "head.name", "head.params", fixed=("embedding_size", "num_classes"))
    check_part(cfg, LOSSES, "loss.name", "loss.params", fixed=("class_weights",))


def refused_by(cfg: Config, section: str, err: ValueError) -> ConfigError:
    """A value that the constructor of the head or loss refuses (an arcface variant, a negative focal
    gamma): its message, with the part, its params and where they were set."""
    part = getattr(cfg, section)
    where = cfg.origin(f"{section}.params")
    what = f"{section} {part.name} ({section}.params {part.params})"
    return ConfigError(f"{where}: {what}: {err}" if where else f"{what}: {err}")


def build_classifier(cfg: Config, num_classes: int) -> PartialFC:
    try:
        return PartialFC(
            cfg.head.name, cfg.model.embedding_size, num_classes, cfg.head.sample_rate,
            init_seed=cfg.experiment.seed,
            interclass_filtering_threshold=cfg.head.interclass_filtering_threshold, **cfg.head.params,
        )  # fmt: skip
    except ValueError as err:
        raise refused_by(cfg, "head", err) from None


def build_loss(cfg: Config, labels: np.ndarray, num_classes: int) -> nn.Module:
    params = dict(cfg.loss.params)
    if cfg.loss.class_weights == "inverse_log_frequency":
        counts = torch.from_numpy(np.bincount(labels, minlength=num_classes))
        params["class_weights"] = inverse_log_frequency_weights(counts.clamp(min=1))
    try:
        loss = LOSSES.build(cfg.loss.name, **params)
    except ValueError as err:
        raise refused_by(cfg, "loss", err) from None
    if cfg.head.name == "none" and hasattr(loss, "reduce"):
        raise ConfigError(
            f"loss.name {cfg.loss.name!r} is a loss on a head's cross-entropy; head.name none needs a loss "
            "on the embeddings (triplet, probface)"
        )
    if cfg.head.name != "none" and not hasattr(loss, "reduce"):
        raise ConfigError(
            f"loss.name {cfg.loss.name!r} is not a loss on the head's cross-entropy (a loss on the "
            "embeddings trains with head.name: none)"
        )
    if isinstance(loss, ProbFaceLoss) != (cfg.model.uncertainty != "none"):
        raise ConfigError("loss.name probface and model.uncertainty (scalar or per_dim) go together")
    return loss


def check_metric_settings(cfg: Config) -> None:
    """Settings that only work together (metric learning, ProbFace), checked before anything is built."""
    if cfg.head.name == "none":
        if cfg.data.sampler != "pk":
            raise ConfigError(
                "head.name none trains on the embeddings, whose loss needs several images per identity in "
                "each batch: set data.sampler: pk"
            )
        if cfg.mining.difficulty:
            raise ConfigError("mining.difficulty tracks a head's target cosines; head.name is none")
    if cfg.model.uncertainty != "none" and cfg.head.name != "none":
        raise ConfigError("model.uncertainty (ProbFace) trains with head.name: none and loss.name: probface")
    if cfg.model.freeze_backbone and cfg.model.uncertainty == "none":
        raise ConfigError("model.freeze_backbone leaves nothing to train without model.uncertainty")


def build_sampler(cfg: Config, faces: FaceDataset, world: int, rank: int) -> GlobalBatchSampler:
    if cfg.data.sampler == "pk":
        return PKBatchSampler(
            faces.source.indices_per_identity(), cfg.data.batch_size, cfg.data.pk_k, world, rank,
            cfg.optim.grad_accum, seed=cfg.experiment.seed,
        )  # fmt: skip
    return GlobalBatchSampler(
        len(faces), cfg.data.batch_size, world, rank, cfg.optim.grad_accum, seed=cfg.experiment.seed
    )


def backbone_settings(cfg: Config) -> list[tuple[str, str, Any]]:
    """What a backbone's weights were built for: (key in a checkpoint's ``meta``, config key, this run's
    value). A checkpoint that differs in any is refused before its weights are loaded."""
    return [
        ("arch", "model.backbone", cfg.model.backbone),
        ("embedding_size", "model.embedding_size", cfg.model.embedding_size),
        ("input_size", "model.input_size", cfg.model.input_size or cfg.data.image_size),
        ("color", "data.color", cfg.data.color),
    ]


def mismatched(meta: dict[str, Any], settings: list[tuple[str, str, Any]], known_only: bool = False) -> str:
    """The settings in which ``meta`` differs from this run, as "arch 'r18' (this run: 'mbf'), ...; set
    model.backbone, ... to match it" ('' when none; ``known_only`` passes keys the checkpoint lacks)."""
    wrong = [(f"{k} {meta.get(k)!r} (this run: {v!r})", key) for k, key, v in settings
             if meta.get(k) != v and not (known_only and meta.get(k) is None)]  # fmt: skip
    if not wrong:
        return ""
    keys = ", ".join(dict.fromkeys(key for _, key in wrong))
    return f"{', '.join(text for text, _ in wrong)}; set {keys} to match it"


def load_pretrained(cfg: Config, backbone: nn.Module) -> None:
    """The backbone weights of checkpoint ``model.pretrained``, trained with this run's architecture,
    embedding and input size and colour order."""
    path = cfg.model.pretrained
    state = load_checkpoint(path)
    wrong = mismatched(state.get("meta", {}), backbone_settings(cfg))
    if wrong:
        raise CheckpointError(f"model.pretrained {path}: trained with {wrong}")
    backbone.load_state_dict(state["backbone"])


def build_uncertainty(cfg: Config, backbone: nn.Module) -> UncertaintyModule | None:
    if cfg.model.uncertainty == "none":
        return None
    if not has_feature_output(backbone):
        raise ConfigError(
            f"model.backbone {cfg.model.backbone} does not return its last feature map "
            "(forward(x, return_features=True)), which model.uncertainty reads"
        )
    momentum = cfg.model.uncertainty_bn_momentum
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"model.uncertainty_bn_momentum must be in (0, 1], got {momentum}")
    in_features = conv_final_size(backbone, cfg.model.input_size or cfg.data.image_size)
    return UncertaintyModule(
        in_features, cfg.model.uncertainty, cfg.model.embedding_size, bn_momentum=momentum
    )


def val_set_paths(cfg: Config) -> list[Path]:
    """The ``.bin`` files of ``data.val_targets`` in ``data.val_root`` (none when it is empty).
    Every one must exist: a missing set stops the run before the first step."""
    if not cfg.data.val_root:
        return []
    root = Path(cfg.data.val_root)
    missing = [name for name in cfg.data.val_targets if not (root / f"{name}.bin").is_file()]
    if missing:
        raise FileNotFoundError(f"data.val_root {root} has no {', '.join(m + '.bin' for m in missing)}")
    return [root / f"{name}.bin" for name in cfg.data.val_targets]


def check_labels(labels: np.ndarray, num_classes: int, root: str) -> None:
    if labels.size == 0:
        raise TrainingError(f"data.root {root} holds no images")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise TrainingError(
            f"data.root {root}: image {int(bad[0])} has label {int(labels[bad[0]])} outside "
            f"[0, {num_classes}) ({bad.size} such images); the identity header and the labels disagree"
        )


def build(cfg: Config, device: torch.device) -> Run:
    """Data, model, classifier, loss, optimizer and schedule of ``cfg``, checked before any step."""
    rank, world = get_rank(), get_world_size()
    check_parts(cfg)
    check_metric_settings(cfg)
    if cfg.train.best_metric != "mean" and cfg.train.best_metric not in cfg.data.val_targets:
        raise ConfigError(
            f"train.best_metric {cfg.train.best_metric!r} is neither 'mean' nor in data.val_targets"
        )
    faces = build_train_dataset(cfg.data, seed=cfg.experiment.seed)
    num_classes = faces.num_identities
    if cfg.head.name != "none" and num_classes < 2:
        raise TrainingError(
            f"data.root {cfg.data.root} holds {num_classes} identity: a classifier needs at least 2 "
            "(with one, the loss is 0 from the first step and nothing is learnt)"
        )
    labels = np.asarray(faces.source.labels(), dtype=np.int64)
    check_labels(labels, num_classes, cfg.data.root)
    dataset = KeyedFaceDataset(faces, seed=cfg.experiment.seed)
    sampler = build_sampler(cfg, faces, world, rank)
    torch.manual_seed(cfg.experiment.seed)  # the same initial weights on every rank
    backbone = build_model(cfg)
    if cfg.model.pretrained:
        load_pretrained(cfg, backbone)
    uncertainty = build_uncertainty(cfg, backbone)
    backbone = backbone.to(device)
    if cfg.model.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    classifier = build_classifier(cfg, num_classes).to(device) if cfg.head.name != "none" else None
    loss = build_loss(cfg, labels, num_classes).to(device)
    model: nn.Module = backbone
    if uncertainty is not None:
        uncertainty = uncertainty.to(device)
        model = ProbFaceNet(backbone, uncertainty, frozen_backbone=cfg.model.freeze_backbone)
    if world > 1:
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.model.ddp_bucket_mb,
            static_graph=cfg.model.ddp_static_graph,
        )
        register_sum_hook(model, fp16=cfg.model.ddp_fp16_grads)
    if cfg.model.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg.optim, [m for m in (backbone, uncertainty, classifier) if m is not None])
    total_steps = sampler.steps_per_epoch * cfg.train.epochs
    scheduler = build_scheduler(optimizer, cfg.schedule, sampler.steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler(device.type, growth_interval=100) if cfg.model.precision == "fp16" else None
    difficulty = None
    if cfg.mining.difficulty:
        difficulty = DifficultyScores(len(dataset), cfg.mining.momentum, seed=cfg.experiment.seed).to(device)
    miner = build_miner(cfg, faces.source.indices_per_identity(), classifier)
    run = Run(
        cfg=cfg, device=device, out=Path(cfg.output_dir), dataset=dataset, sampler=sampler,
        backbone=backbone, model=model, classifier=classifier, loss=loss, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, val_paths=val_set_paths(cfg), total_steps=total_steps,
        num_classes=num_classes, uncertainty=uncertainty, difficulty=difficulty, miner=miner,
    )  # fmt: skip
    if miner is not None:  # mined images take the training transform of the current epoch
        miner.load = lambda positions: torch.stack([run.dataset[(run.epoch, int(i))][0] for i in positions])
    return run


def build_miner(cfg: Config, positions: dict, classifier: PartialFC) -> ClosenessDiversityMiner | None:
    m = cfg.mining
    if m.cd_interval <= 0:
        return None
    if not m.difficulty:
        raise ConfigError("mining.cd_interval needs mining.difficulty: true (stage 2 mines by the scores)")
    classifier.keep_cosines = True
    return ClosenessDiversityMiner(
        positions, classes=m.cd_classes, num_easy=m.cd_easy, num_hard=m.cd_hard, negatives=m.cd_negatives,
        weight_closeness=m.cd_weight_closeness, weight_diversity=m.cd_weight_diversity,
        percentile=m.cd_percentile, scale=m.cd_scale, prototype_rows=m.cd_prototypes,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ train


def seed_step(run: Run) -> None:
    """Reseed torch (CPU and CUDA), NumPy's and Python's global generators from (seed, rank, step).

    Everything random in a step is then a function of those numbers: dropout and Partial FC's class
    sampling (torch), and whatever a plugged-in module draws from a global generator. The rest is keyed too
    (the batch order by (seed, epoch), each image's augmentation by (seed, epoch, index)). So a run resumed
    from a checkpoint's step and sampler position draws on every rank what the uninterrupted run drew,
    although the checkpoint, written by rank 0 alone, holds no generator state (it could hold only rank 0's).
    """
    torch_seed, other_seed = np.random.SeedSequence(
        [run.cfg.experiment.seed, get_rank(), run.step]
    ).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(other_seed))
    random.seed(int(other_seed))


def network_input(run: Run, images: torch.Tensor) -> torch.Tensor:
    x = normalize_batch(
        images.to(run.device, non_blocking=True), run.cfg.data.color, run.cfg.model.input_size
    )
    return x.contiguous(memory_format=torch.channels_last) if run.cfg.model.channels_last else x


def forward_loss(run: Run, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of one micro-batch: the global-batch loss on the sharded classifier, plus a head's own
    regulariser (MagFace) as this rank's share of a global mean. Without a head, the loss of this PK
    micro-batch on its own, as this rank's share of the mean over the ranks (DDP sums their gradients)."""
    outputs = run.model(network_input(run, images))
    embeddings = outputs if torch.is_tensor(outputs) else outputs[0]
    run.finite_embeddings.append(torch.isfinite(embeddings).all())  # read only when the step goes bad
    if run.classifier is None:
        return run.loss(outputs, labels.to(run.device, non_blocking=True)) / get_world_size()
    ce, all_labels = run.classifier.per_sample_ce(embeddings, labels.to(run.device, non_blocking=True))
    loss = run.loss.reduce(ce, all_labels)
    regularizer = getattr(run.classifier.head, "regularizer", None)
    if regularizer is not None:
        loss = loss + regularizer(embeddings) / get_world_size()
    return loss


def train_step(run: Run, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (NaN when skipped)."""
    seed_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    run.finite_embeddings.clear()
    # BN statistics and head buffers as they were: a skipped step must not leave inf/NaN in them
    buffers = [b for m in trained_modules(run) for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    losses, seen = [], []
    for i, (images, labels, indices) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(run.model, "no_sync") else run.model.no_sync()
        with sync:
            loss = forward_loss(run, images, labels) / len(micro_batches)
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        losses.append(loss.detach())
        if run.difficulty is not None:  # this rank's rows of the global batch's target cosines
            rows = slice(get_rank() * len(labels), (get_rank() + 1) * len(labels))
            seen.append((indices, run.classifier.last_target_cos[rows]))
    total = float(torch.stack(losses).sum())
    # The one guard: non-finite embeddings and logits reach the loss (Partial FC lets them through, on every
    # rank alike), and BN statistics or head buffers can overflow while the loss is still finite.
    floats = [b.detach().reshape(-1).float() for b in buffers if b.is_floating_point()]
    buffers_finite = not floats or bool(torch.isfinite(torch.cat(floats)).all())
    if any_rank(not (math.isfinite(total) and buffers_finite)):
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, old in zip(buffers, saved, strict=True):
                buffer.copy_(old)
        run.bad_steps += 1
        run.skipped_steps += 1
        if run.bad_steps >= run.cfg.train.max_bad_steps:
            raise TrainingError(diverged(run, total, buffers_finite, micro_batches[-1][1]))
        run.scheduler.step()
        return math.nan
    run.bad_steps = 0
    for indices, target_cos in seen:  # only a step that counts moves the scores
        run.difficulty.update(indices.to(run.device), target_cos)
    if run.miner is not None and is_mining_step(run.step, run.cfg.mining.cd_interval):
        add_mined_gradient(run, micro_batches[-1][1])
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.optim.grad_clip > 0:
        clipped = [p for m in (run.backbone, run.uncertainty) if m is not None for p in m.parameters()]
        torch.nn.utils.clip_grad_norm_(clipped, run.cfg.optim.grad_clip)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    return total


def diverged(run: Run, total: float, buffers_finite: bool, labels: torch.Tensor) -> str:
    """Why the run stops after ``train.max_bad_steps`` skipped steps in a row: the step, what was not
    finite, and the last checkpoint written (every one is finite: :func:`save` checks)."""
    if not math.isfinite(total):
        what = f"loss is {total}"
    elif not buffers_finite:
        what = f"BN statistics or head buffers are not finite (loss {total:.4g})"
    else:
        what = "the loss or buffers of another rank are not finite"
    embeddings = "" if all(bool(f) for f in run.finite_embeddings) else "the embeddings hold NaN or inf; "
    return (
        f"step {run.step}: {what} for {run.bad_steps} steps in a row ({embeddings}train.max_bad_steps "
        f"{run.cfg.train.max_bad_steps}; labels of the last batch begin {labels[:16].tolist()}): if the run "
        f"diverged, lower optim.lr or set optim.grad_clip; last good checkpoint: "
        f"{run.last_checkpoint or 'none written yet'}"
    )


def trained_modules(run: Run) -> list[nn.Module]:
    return [m for m in (run.backbone, run.uncertainty, run.classifier) if m is not None]


def train_mode(run: Run) -> None:
    """Training mode, except for a frozen backbone, which keeps its BN statistics and no dropout."""
    for module in trained_modules(run):
        module.train(module is not run.backbone or not run.cfg.model.freeze_backbone)


def add_mined_gradient(run: Run, labels: torch.Tensor) -> None:
    """Closeness-diversity stage 2: the mined batch's gradient joins the step's (skipped if not finite)."""
    rng = np.random.default_rng([run.cfg.experiment.seed, get_rank(), run.step])
    scale = run.scaler.get_scale() if run.scaler else 1.0
    grads, terms = run.miner.gradient(
        run.backbone, run.classifier, run.difficulty, labels, lambda x: network_input(run, x), rng, scale
    )
    if any_rank(not (math.isfinite(terms.closeness) and math.isfinite(terms.diversity))):
        return  # on every rank alike: the gradients were already summed over ranks
    params = [p for p in run.backbone.parameters() if p.requires_grad]
    for p, g in zip(params, grads, strict=True):
        p.grad = g if p.grad is None else p.grad.add_(g)
    run.mined = terms


def epoch_loader(run: Run) -> Iterable[Any]:
    """The micro-batches of epoch ``run.epoch`` from step ``run.step_in_epoch`` on; a bad record stops the
    run or is replaced and counted (``data.bad_records``), whatever the number of workers."""
    run.sampler.set_epoch(run.epoch, run.step_in_epoch)
    return run.dataset.loader(run.sampler, run.cfg.data.num_workers, pin_memory=run.device.type == "cuda")


def micro_batch_groups(loader: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def train_one_epoch(run: Run, log: Logbook, limit: int) -> None:
    """Run epoch ``run.epoch`` from ``run.step_in_epoch`` on, validating and saving as configured, until
    the epoch ends or ``run.step`` reaches ``limit``."""
    cfg = run.cfg
    loader = epoch_loader(run)
    train_mode(run)
    window_loss, window_good, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
    for micro_batches in micro_batch_groups(loader, cfg.optim.grad_accum):
        loss = train_step(run, micro_batches)
        run.step += 1
        run.step_in_epoch += 1
        window_steps += 1
        if math.isfinite(loss):
            window_loss, window_good = window_loss + loss, window_good + 1
        rate = window_steps * run.sampler.global_batch / max(1e-9, time.perf_counter() - window_start)
        lr = run.optimizer.param_groups[0]["lr"]
        log.progress(1, {"loss": f"{loss:.3f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}"})
        if run.step % cfg.train.log_every == 0 or run.step == limit:
            elapsed = time.perf_counter() - window_start
            report(run, log, window_loss / window_good if window_good else math.nan, window_steps, elapsed)
            window_loss, window_good, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
        if run.step == limit or run.step == run.total_steps:
            break  # fit() validates and saves the end
        validate_now = bool(cfg.train.val_every) and run.step % cfg.train.val_every == 0
        save_now = bool(cfg.train.save_every) and run.step % cfg.train.save_every == 0
        best = validate_now and validate_and_log(run, log)
        if best or save_now:
            save(run, log, best=best)
        if validate_now or save_now:
            window_start = time.perf_counter()  # images/s counts training, not validation or saving
    if run.step_in_epoch == run.sampler.steps_per_epoch:
        run.epoch, run.step_in_epoch = run.epoch + 1, 0


def report(run: Run, log: Logbook, loss: float, steps: int, elapsed: float) -> None:
    images = steps * run.sampler.global_batch
    values = {
        "train/loss": loss,
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "train/images_per_s": images / elapsed if elapsed > 0 else 0.0,
        "train/skipped_steps": float(run.skipped_steps),
    }
    if run.scaler:
        values["train/grad_scale"] = float(run.scaler.get_scale())
    bad_records = run.dataset.bad_records
    if bad_records.mode == "skip":
        values["data/bad_records"] = float(bad_records.count)
        for problem in bad_records.take_unlogged():
            log.line(f"bad record, trained on another image of its identity instead: {problem}")
    if run.difficulty is not None:
        values["mining/difficulty_mean"] = float(run.difficulty.scores.mean())
    if run.mined is not None:
        values.update({"mining/closeness": run.mined.closeness, "mining/diversity": run.mined.diversity,
                       "mining/threshold": run.mined.threshold})  # fmt: skip
    for name, buffer in run.classifier.head.named_buffers() if run.classifier is not None else ():
        if buffer.ndim == 0:  # AdaFace batch_mean/batch_std, CurricularFace t
            values[f"head/{name}"] = float(buffer)
    # the last micro-batch's terms of a loss on the embeddings (active triplets, ProbFace's MLS, ...)
    values.update({f"loss/{k}": float(v) for k, v in getattr(run.loss, "last_stats", {}).items()})
    log.scalars(run.step, values)
    text = " ".join(f"{k.split('/')[1]} {v:.5g}" for k, v in values.items())
    log.line(f"epoch {run.epoch} step {run.step}/{run.total_steps} {text}")


# --------------------------------------------------------------------------------------- evaluate


def evaluate(run: Run) -> dict[str, dict[str, float]]:
    """10-fold accuracy (docs/methods.md §5.2, flip-sum fusion) on every validation set. Every rank embeds
    its share of the images and receives all features, so no rank waits on another past the collective
    timeout."""
    embedder = TorchEmbedder(run.backbone, run.cfg.data.color, run.device, run.cfg.model.channels_last)
    results = {}
    for val in run.val_sets:
        original, flipped = extract(embedder, val.images, run.cfg.train.val_batch_size, flip=True, shard=True)
        results[val.name] = score(original, flipped, val.issame, "sum")
    train_mode(run)
    return results


def validate_and_log(run: Run, log: Logbook) -> bool:
    """Evaluate, log, and tell whether this is the best result so far (by ``train.best_metric``)."""
    if not run.val_sets:
        return False
    results = evaluate(run)
    run.validation = results
    shown = ("accuracy", "accuracy_std", "val_at_far_1e-3", "feature_norm")
    for name, metrics in results.items():
        log.scalars(run.step, {f"val/{name}_{key}": metrics[key] for key in shown})
    mean = float(np.mean([m["accuracy"] for m in results.values()]))
    log.scalars(run.step, {"val/mean_accuracy": mean})
    table = " ".join(
        f"{n} {m['accuracy'] * 100:.2f}±{m['accuracy_std'] * 100:.2f}" for n, m in results.items()
    )
    log.line(f"validation step {run.step}: {table} mean {mean * 100:.2f}")
    metric = mean if run.cfg.train.best_metric == "mean" else results[run.cfg.train.best_metric]["accuracy"]
    if metric > run.best:
        run.best = metric
        return True
    return False


# ------------------------------------------------------------------------------------ save/resume


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict (DESIGN.md): every rank must call it (the classifier shards are gathered)."""
    cfg = run.cfg
    return {
        "config": config_to_dict(cfg),
        "backbone": run.backbone.state_dict(),
        "head": run.classifier.state_dict() if run.classifier is not None else {},
        "optimizer": (
            run.classifier.optimizer_state_dict(run.optimizer)
            if run.classifier is not None
            else run.optimizer.state_dict()
        ),
        "uncertainty": run.uncertainty.state_dict() if run.uncertainty is not None else None,
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "step": run.step,
        "epoch": run.epoch,
        "sampler": {
            "epoch": run.epoch,
            "step_in_epoch": run.step_in_epoch,
            "global_batch": run.sampler.global_batch,
            "seed": cfg.experiment.seed,
        },
        "train": {"best": run.best, "skipped_steps": run.skipped_steps},
        "validation": run.validation,
        "difficulty": run.difficulty.scores if run.difficulty is not None else None,
        "meta": {
            "arch": cfg.model.backbone,
            "embedding_size": cfg.model.embedding_size,
            "input_size": cfg.model.input_size or cfg.data.image_size,
            "color": cfg.data.color,
            "normalization": NORMALIZATION,
            "num_classes": run.num_classes,
            "head": cfg.head.name,
            "uncertainty": cfg.model.uncertainty,
        },
    }


def save(run: Run, log: Logbook, best: bool = False) -> None:
    """Write ``step_N.pt`` (and point last.pt/best.pt at it) on rank 0. A state holding NaN or inf anywhere
    (weights, BN statistics, head buffers, optimizer state) is not written: the run stops, naming the
    tensor and the last good checkpoint, which stays as it was."""
    state = checkpoint_state(run)  # a collective: every rank takes part, rank 0 writes
    target = run.out / f"step_{run.step}.pt"

    def write() -> None:
        bad = nonfinite_entry(state)
        if bad is not None:
            raise TrainingError(
                f"step {run.step}: {target.name} not written: {bad} holds NaN or inf (the run diverged: "
                f"lower optim.lr or set optim.grad_clip); last good checkpoint: "
                f"{run.last_checkpoint or 'none written yet'}"
            )
        save_step_checkpoint(run.out, run.step, state, run.cfg.train.keep_last, best)

    on_rank0(write, f"write {target}")
    run.last_checkpoint = target
    log.line(f"saved {target}" + (" (best)" if best else ""))


def on_rank0(action: Callable[[], Any], what: str) -> Any:
    """``action()`` on rank 0 alone (its result there, None elsewhere). When it fails, every rank stops
    (the others with a line pointing at rank 0's), so none is left waiting at the next collective."""
    error: BaseException | None = None
    result = None
    if get_rank() == 0:
        try:
            result = action()
        except Exception as err:  # re-raised below, on every rank
            error = err
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise TrainingError(f"rank 0 could not {what} (its message says why)")
    return result


def resume(run: Run, path: Path) -> str:
    """Continue from checkpoint ``path``: weights, head buffers, optimizer, schedule, scaler, position.
    Everything is checked before anything is loaded (:func:`check_resumable`). Settings changed since the
    checkpoint take effect from the resumed step, the optimizer's included: its state (momentum, moments)
    is the checkpoint's, its hyperparameters and base learning rate this run's, the schedule's factor
    taken at the resumed step. Returns the line to log."""
    state = load_checkpoint(path, map_location=run.device)
    check_resumable(run, path, state)
    sampler = state["sampler"]
    old = config_to_dict(config_from_dict(state["config"], source=str(path)))
    changed = [f"{s}.{k} {old.get(s, {}).get(k)!r} -> {v[k]!r}"
               for s, v in config_to_dict(run.cfg).items() if isinstance(v, dict)
               for k in v if old.get(s, {}).get(k) != v[k]]  # fmt: skip
    run.backbone.load_state_dict(state["backbone"])
    if run.uncertainty is not None:
        run.uncertainty.load_state_dict(state["uncertainty"])
    settings = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    base_lrs = list(run.scheduler.base_lrs)
    if run.classifier is not None:
        run.classifier.load_state_dict(state["head"])
        run.classifier.load_optimizer_state_dict(run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scheduler.base_lrs = base_lrs
    step = run.scheduler.last_epoch
    lrs = [base * factor(step) for factor, base in zip(run.scheduler.lr_lambdas, base_lrs, strict=True)]
    for group, ours, lr in zip(run.optimizer.param_groups, settings, lrs, strict=True):
        group.update(ours, lr=lr)
    run.scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.step_in_epoch = state["step"], sampler["epoch"], sampler["step_in_epoch"]
    run.best, run.skipped_steps = state["train"]["best"], state["train"]["skipped_steps"]
    run.validation = state["validation"]
    if run.difficulty is not None and state.get("difficulty") is not None:
        run.difficulty.scores.copy_(state["difficulty"])
    elif run.difficulty is not None:
        changed.append("mining.difficulty (scores start at U(0, 1): the checkpoint has none)")
    run.last_checkpoint = path
    note = f"resumed {path} at epoch {run.epoch} step {run.step}"
    if changed:
        note += f"; changed since the checkpoint, applied from step {run.step}: {', '.join(changed)}"
    return note


def check_resumable(run: Run, path: Path, state: dict[str, Any]) -> None:
    """Refuse, in one line naming ``path``, the setting and both values, a checkpoint this run cannot
    continue: no training state, another global batch or seed, a model, classifier or optimizer of
    another shape (architecture, embedding or input size, colour order, head, class count, optimizer,
    parameter groups), difficulty scores of another dataset size."""
    missing = [key for key in ("optimizer", "sampler", "head", "scheduler") if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: holds no {', '.join(missing)}: a weights-only checkpoint cannot be resumed"
        )
    sampler = state["sampler"]
    if sampler["global_batch"] != run.sampler.global_batch:
        raise CheckpointError(
            f"{path}: trained with a global batch of {sampler['global_batch']} images, this run has "
            f"{run.sampler.global_batch} ({run.cfg.data.batch_size} per process x {get_world_size()} "
            f"processes x {run.cfg.optim.grad_accum} accumulated); set data.batch_size or optim.grad_accum "
            "so they match"
        )
    if sampler["seed"] != run.cfg.experiment.seed:
        raise CheckpointError(
            f"{path}: trained with seed {sampler['seed']}, this run has {run.cfg.experiment.seed}"
        )
    meta = dict(state.get("meta", {}))
    if bool(state["head"]) != (run.classifier is not None):
        raise CheckpointError(
            f"{path}: trained with head {meta.get('head')!r}, this run has head.name "
            f"{run.cfg.head.name!r}: a classifier and a loss on the embeddings do not resume one another"
        )
    if (state.get("uncertainty") is not None) != (run.uncertainty is not None):
        raise CheckpointError(
            f"{path}: model.uncertainty was {meta.get('uncertainty', 'none')!r}, this run has "
            f"{run.cfg.model.uncertainty!r}"
        )
    if state["head"] and "num_classes" not in meta and torch.is_tensor(state["head"].get("weight")):
        meta["num_classes"] = int(state["head"]["weight"].shape[0])
    settings = [
        *backbone_settings(run.cfg),
        ("uncertainty", "model.uncertainty", run.cfg.model.uncertainty),
        ("head", "head.name", run.cfg.head.name),
        ("num_classes", "data.root", run.num_classes),  # the classes are those of the data
    ]
    wrong = mismatched(meta, settings, known_only=True)
    if wrong:
        hint = ""
        if not mismatched(meta, backbone_settings(run.cfg), known_only=True):
            hint = f" (a new classifier on its backbone: a new run with model.pretrained={path})"
        raise CheckpointError(f"{path}: trained with {wrong}, or start a new output_dir{hint}")
    old_optim = state.get("config", {}).get("optim", {}).get("name")
    if old_optim is not None and old_optim != run.cfg.optim.name:
        raise CheckpointError(
            f"{path}: trained with optim.name {old_optim!r} (this run: {run.cfg.optim.name!r}): its "
            "optimizer state does not carry over; set optim.name to match it, or start a new output_dir"
        )
    saved_groups = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
    groups = [len(group["params"]) for group in run.optimizer.param_groups]
    if saved_groups != groups:
        raise CheckpointError(
            f"{path}: its optimizer holds parameter groups of {saved_groups} tensors, this run's of {groups} "
            "(optim.no_decay_bn_bias, model.freeze_backbone or the trained modules differ); set them as "
            "the checkpoint was trained"
        )
    modules = [("backbone", run.backbone.state_dict(), "model.backbone", run.cfg.model.backbone)]
    if run.uncertainty is not None:
        modules.append(
            ("uncertainty", run.uncertainty.state_dict(), "model.uncertainty", run.cfg.model.uncertainty)
        )
    if run.classifier is not None:
        head = dict(run.classifier.head.state_dict())
        head["weight"] = torch.empty(run.num_classes, run.cfg.model.embedding_size, device="meta")
        modules.append(("head", head, "head.name", run.cfg.head.name))
    for name, expected, key, value in modules:
        misfit = state_misfit(state[name], expected)
        if misfit:
            raise CheckpointError(f"{path}: its {name} does not fit this run's {key} {value!r}: {misfit}")
    scores = state.get("difficulty")
    if run.difficulty is not None and scores is not None and scores.shape != run.difficulty.scores.shape:
        raise CheckpointError(
            f"{path}: difficulty scores of {scores.numel()} images, the data has "
            f"{run.difficulty.scores.numel()}"
        )


def state_misfit(saved: dict[str, Any], expected: dict[str, Any]) -> str:
    """What keeps ``saved`` from loading where ``expected`` is (missing and unexpected keys, other
    shapes), in a few words naming the first of each; '' when it fits."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing ({missing[0]}, ...)")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({unexpected[0]}, ...)")
    if shapes:
        k = shapes[0]
        old, new = tuple(saved[k].shape), tuple(expected[k].shape)
        parts.append(f"{len(shapes)} of another shape ({k}: {old}, this run: {new})")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------- main


def fit(
    cfg: Config, resume_from: str = "", device: torch.device | None = None, overwrite: bool = False
) -> Run:
    """Build, resume if asked, train to the end (or ``train.max_steps``), validate and save.

    Nothing is written before every check has passed (the config, the data, the checkpoint to resume
    and its fit with this run, the output folder), so a refused run leaves ``output_dir`` as it was.
    ``overwrite`` starts in a folder holding another run's checkpoints, after moving them aside."""
    device = device or init_distributed(cfg.train.collective_timeout_s, cfg.train.launcher_watch_s)
    if cfg.model.freeze_backbone and not cfg.model.pretrained:
        raise ConfigError(
            "model.freeze_backbone needs model.pretrained, the checkpoint whose backbone to keep"
        )
    if overwrite and resume_from == "auto":
        raise TrainingError(
            "--overwrite starts a new run in output_dir and --resume auto continues the one there: give one"
        )
    run = build(cfg, device)
    run.val_sets = [load_bin(path) for path in run.val_paths]
    path = resolve_resume(resume_from, run.out) if resume_from else None
    note = resume(run, path) if path is not None else None
    if note is None and resume_from == "auto":
        note = f"no checkpoint in {run.out}; starting fresh"
    on_rank0(lambda: check_output_dir(run.out, path, run.step, overwrite), f"use output_dir {run.out}")
    # the first write: every check has passed
    stale, aside = on_rank0(lambda: prepare_output_dir(run, overwrite), f"prepare {run.out}") or ([], None)
    if aside is not None and path is not None and path.parent == run.out:
        run.last_checkpoint = aside / path.name
    log = on_rank0(
        lambda: Logbook(run.out, run.total_steps, start_step=run.step), f"open {run.out / 'train.log'}"
    ) or Logbook(run.out, run.total_steps, enabled=False)
    try:
        if aside is not None:
            log.line(f"--overwrite: the files of the run that was here were moved to {aside}")
        if stale:
            log.line(f"removed {len(stale)} partial files of interrupted writes: {[p.name for p in stale]}")
        if note:
            log.line(note)
        log.line(
            f"{cfg.model.backbone} + {cfg.head.name}: {run.dataset.num_images} images, "
            f"{run.num_classes} classes, {get_world_size()} processes, global batch "
            f"{run.sampler.global_batch}, {run.sampler.steps_per_epoch} steps/epoch, {run.total_steps} steps"
        )
        limit = min(run.total_steps, cfg.train.max_steps or run.total_steps)
        while run.step < limit:
            train_one_epoch(run, log, limit)
        best = validate_and_log(run, log)
        save(run, log, best=best)
        barrier()
        if run.dataset.bad_records.count:
            log.line(run.dataset.bad_records.summary())
    except BaseException as err:
        failure = collective_error(err, step=run.step)  # another rank stopped or died: say which, where
        log.stopped(stop_reason(failure or err))  # train.log says why the run ended, not only the console
        if failure is not None and failure is not err:
            raise failure from err
        raise
    finally:
        log.close()
    return run


# the files of a run in its output_dir (others there are the user's and stay)
RUN_FILES = ("config.yaml", "train.log", "tensorboard", "last.pt", "best.pt")


def run_checkpoints(out: Path) -> list[Path]:
    """The checkpoints in ``out``: ``step_N.pt`` (oldest first), then last.pt and best.pt."""
    return numbered_checkpoints(out) + [out / n for n in ("last.pt", "best.pt") if (out / n).is_file()]


def check_output_dir(out: Path, resumed: Path | None, step: int, overwrite: bool) -> None:
    """Refuse to mix two runs in ``out``: a new run where checkpoints are, or a resumed one where newer
    checkpoints of another course of the run are (they would be overwritten, pruned and re-pointed)."""
    found = run_checkpoints(out) if out.is_dir() else []
    if overwrite or not found:
        return
    aside = f"--overwrite to start over (its files are moved to {out / 'replaced_<date-time>'}/)"
    if resumed is None:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise TrainingError(
            f"output_dir {out} already holds checkpoints ({names}): a new run would overwrite and prune "
            f"them; continue that run with --resume auto, choose a new output_dir, or pass {aside}"
        )
    newer = [p for p in numbered_checkpoints(out) if int(STEP_FILE.fullmatch(p.name).group(1)) > step]
    if newer:
        raise TrainingError(
            f"output_dir {out} holds {newer[-1].name}, newer than step {step} of --resume {resumed}: "
            f"continuing there would mix two runs; --resume auto continues the newest, a new output_dir "
            f"keeps both, or pass {aside}"
        )


def prepare_output_dir(run: Run, overwrite: bool) -> tuple[list[Path], Path | None]:
    """Rank 0's first writes: the previous run's files moved aside (``--overwrite``; never deleted),
    partial files of interrupted saves removed, the resolved config written. Returns (the removed
    partial files, the folder the previous run's files went to or None)."""
    aside = None
    if overwrite and run.out.is_dir() and run_checkpoints(run.out):
        previous = [*run_checkpoints(run.out), *(run.out / name for name in RUN_FILES)]
        aside = run.out / f"replaced_{time.strftime('%Y%m%d-%H%M%S')}"
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        aside.mkdir()
        for item in dict.fromkeys(p for p in previous if p.exists()):
            item.rename(aside / item.name)  # the same file system: instant, and nothing is copied
    stale = remove_stale_temp_files(run.out)  # partial files of saves a kill interrupted
    dump_config(run.cfg, run.out / "config.yaml")
    return stale, aside


def stop_reason(err: BaseException) -> str:
    """The one line that says why a run stopped (on the console and at the end of train.log)."""
    if isinstance(err, OSError):  # the file system's reason, with the path
        return describe_os_error(err)
    if isinstance(err, (*INPUT_ERRORS, CollectiveError)):
        return str(err)
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    return f"unexpected error {type(err).__name__}: {err} (the traceback is on the console)"


def dry_run(cfg: Config, steps: int = 2) -> dict[str, object]:
    """Build everything, run ``steps`` optimizer steps without saving, return what was seen."""
    run = build(cfg, init_distributed(cfg.train.collective_timeout_s, cfg.train.launcher_watch_s))
    loader = epoch_loader(run)
    start, losses = time.perf_counter(), []
    for i, micro_batches in enumerate(micro_batch_groups(loader, cfg.optim.grad_accum)):
        if i == steps:
            break
        losses.append(train_step(run, micro_batches))
        run.step += 1
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        run.backbone.eval()
        embedding = run.backbone(network_input(run, micro_batches[0][0]))
    return {
        "backbone": cfg.model.backbone,
        "parameters_M": round(sum(p.numel() for p in run.backbone.parameters()) / 1e6, 3),
        "head": cfg.head.name,
        "head_parameters_M": round(run.classifier.head.weight.numel() / 1e6, 3) if run.classifier else 0.0,
        "trainable_parameters_M": round(
            sum(q.numel() for group in run.optimizer.param_groups for q in group["params"]) / 1e6, 3
        ),
        "embedding": list(embedding.shape),
        "classes": run.num_classes,
        "images": run.dataset.num_images,
        "global_batch": run.sampler.global_batch,
        "steps_per_epoch": run.sampler.steps_per_epoch,
        "steps": len(losses),
        "losses": [round(v, 4) for v in losses],
        "images_per_s": round(len(losses) * run.sampler.global_batch / elapsed, 1) if elapsed > 0 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    finished = False
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            for key, value in dry_run(cfg).items():
                print(f"{key}: {value}")
        else:
            fit(cfg, args.resume, overwrite=args.overwrite)
        finished = True
        return 0
    except (*INPUT_ERRORS, OSError) as err:  # the user's input or the file system: one line, no traceback
        print(f"train.py: {stop_reason(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:  # a collective that another rank left waiting: one line, no barrier with it
        failure = collective_error(err)
        if failure is None:
            raise
        print(f"train.py: {failure}", file=sys.stderr)
        shutdown_distributed(after_fault=True)
        return FAULT_EXIT_STATUS
    finally:
        # after an error the other ranks may never reach a closing barrier (one rank met a bad record, the
        # others wait in their next collective): leave without one; torchrun stops the rest
        shutdown_distributed(after_fault=not finished)


if __name__ == "__main__":
    sys.exit(main())
