"""Train a face-recognition model from a YAML config, on one process or under torchrun.

    python train.py --config configs/cpu_tiny.yaml --set data.root=PATH output_dir=DIR
    torchrun --nproc_per_node=8 train.py --config configs/recipes/arcface.yaml --set data.root=/data/ms1mv2
    python train.py --config ... --resume auto          # continue DIR/last.pt (fresh start if none)
    python train.py --config ... --overwrite            # a new run in DIR: the old run's files set aside
    python train.py --config ... --dry-run              # build everything, run 2 steps, report

This file is the loop; the way of training is an objective (``objectives/``, ``objective.name``): Partial FC
over a margin head with a loss on the per-sample cross-entropy (``classification``), a loss on the
embeddings of PK batches (``metric``), ProbFace's uncertainty module on a frozen backbone (``probface``), or
a user's. The backbone (with what the objective adds to it) is wrapped in DDP (gradients summed over ranks,
see ``core.distributed``). One optimizer step consumes one global batch of ``data.batch_size x processes x
optim.grad_accum`` images in the order of ``data.sampler``, so a run resumes mid-epoch, and on another number
of processes with the same global batch, exactly where it stopped. ``output_dir`` receives config.yaml,
train.log, tensorboard/, step_N.pt, last.pt and best.pt; a new run into a folder that holds another run's
checkpoints is refused, and every check (config, data, the checkpoint to resume and its fit with this run)
happens before the first write.
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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbones import BACKBONES, build_backbone
from core import spill
from core.checkpoint import (
    CheckpointError,
    backbone_meta,
    copy_mapped_optimizer_state,
    load_checkpoint,
    load_pretrained,
    mismatched,
    nonfinite_entry,
    resolve_resume,
    save_step_checkpoint,
    saved_backbone_settings,
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
from core.fileio import describe_os_error
from core.logbook import Logbook
from core.optim import build_optimizer, build_scheduler
from core.registry import UnknownNameError
from core.run_dir import OutputDirError, check_output_dir, prepare_output_dir
from data import image_folder, recordio
from data.bad_records import BadRecordError
from data.builder import build_train_dataset
from data.decode import DecodeError
from data.sampler import GlobalBatchSampler, KeyedFaceDataset, PKBatchSampler
from data.transforms import FaceDataset, normalize_batch
from data.verification import VerificationFileError, VerificationSet, load_bin
from evaluation.embedders import TorchEmbedder
from evaluation.extract import extract
from evaluation.verification import verification_results
from objectives import Objective, StepContext, TrainingData, TrainingError, objective_class
from objectives.base import check_fits
from objectives.ema import ModelEma, build_ema, describe_ema, resume_ema

# Errors about the user's input (config, data, checkpoint): reported in one line, without a traceback.
INPUT_ERRORS = (
    ConfigError, CheckpointError, TrainingError, UnknownNameError, FileNotFoundError, DecodeError,
    recordio.RecordIOError, recordio.FolderLayoutError, image_folder.FolderLayoutError, VerificationFileError,
    BadRecordError, OutputDirError,
)  # fmt: skip


@dataclasses.dataclass
class TrainState:
    """Where a run stands: what a checkpoint's ``step``, ``epoch``, ``sampler``, ``train`` and
    ``validation`` entries hold (:meth:`state_dict`), plus two counts that live only in the process."""

    global_batch: int  # images per optimizer step over all ranks (a resumed run must have the same)
    seed: int
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    best: float = -math.inf  # the best validation result so far (train.best_metric)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or buffer, over the whole run
    validation: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # the latest results
    # the latest results of the average (train.ema), saved in the checkpoint's ``ema`` entry
    ema_validation: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    bad_steps: int = 0  # non-finite steps in a row (not saved)
    last_checkpoint: Path | None = None  # the last checkpoint written or resumed (not saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "sampler": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_batch": self.global_batch,
                "seed": self.seed,
            },
            "train": {"best": self.best, "skipped_steps": self.skipped_steps},
            "validation": self.validation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position and results of a checkpoint whose global batch and seed are this run's."""
        sampler = state["sampler"]
        self.step, self.epoch, self.step_in_epoch = state["step"], sampler["epoch"], sampler["step_in_epoch"]
        self.best, self.skipped_steps = state["train"]["best"], state["train"]["skipped_steps"]
        self.validation = state["validation"]


@dataclasses.dataclass
class Run:
    """The parts of a training run, built once by :func:`build`, and where it stands (``state``)."""

    cfg: Config
    device: torch.device
    out: Path
    dataset: KeyedFaceDataset
    sampler: GlobalBatchSampler
    backbone: nn.Module  # the bare backbone (what checkpoints hold)
    objective: Objective  # the way of training: its modules, loss and checkpoint entries
    model: nn.Module  # objective.network(backbone) as trained: DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    total_steps: int
    val_paths: list[Path]
    state: TrainState
    val_sets: list[VerificationSet] = dataclasses.field(default_factory=list)  # decoded by fit()
    ema: ModelEma | None = None  # the average of the backbone's weights (train.ema), None when off


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


def check_settings(cfg: Config) -> type[Objective]:
    """The backbone and the objective the config names (with the parts and settings the objective checks),
    and the validation setting, refused before anything is built. Returns the objective's class."""
    check_part(cfg, BACKBONES, "model.backbone")
    objective = objective_class(cfg)
    if cfg.train.best_metric != "mean" and cfg.train.best_metric not in cfg.data.val_targets:
        raise ConfigError(
            f"train.best_metric {cfg.train.best_metric!r} is neither 'mean' nor in data.val_targets"
        )
    return objective


def build_sampler(cfg: Config, faces: FaceDataset, world: int, rank: int) -> GlobalBatchSampler:
    if cfg.data.sampler == "pk":
        return PKBatchSampler(
            faces.source.indices_per_identity(), cfg.data.batch_size, cfg.data.pk_k, world, rank,
            cfg.optim.grad_accum, seed=cfg.experiment.seed,
        )  # fmt: skip
    return GlobalBatchSampler(
        len(faces), cfg.data.batch_size, world, rank, cfg.optim.grad_accum, seed=cfg.experiment.seed
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


def to_network_input(images: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """uint8 images -> the network's input on ``device`` (normalised, resized, in its memory format)."""
    x = normalize_batch(images.to(device, non_blocking=True), cfg.data.color, cfg.model.input_size)
    return x.contiguous(memory_format=torch.channels_last) if cfg.model.channels_last else x


def build(cfg: Config, device: torch.device) -> Run:
    """Data, backbone, objective, optimizer and schedule of ``cfg``, checked before any step."""
    rank, world = get_rank(), get_world_size()
    objective_cls = check_settings(cfg)
    faces = build_train_dataset(cfg.data, seed=cfg.experiment.seed)
    labels = np.asarray(faces.source.labels(), dtype=np.int64)
    check_labels(labels, faces.num_identities, cfg.data.root)
    dataset = KeyedFaceDataset(faces, seed=cfg.experiment.seed)
    sampler = build_sampler(cfg, faces, world, rank)
    state = TrainState(global_batch=sampler.global_batch, seed=cfg.experiment.seed)

    def load(positions: np.ndarray) -> torch.Tensor:  # images of the current epoch's training transform
        return torch.stack([dataset[(state.epoch, int(i))][0] for i in positions])

    data = TrainingData(
        labels=labels, num_classes=faces.num_identities,
        indices_per_identity=faces.source.indices_per_identity, load=load,
        network_input=lambda images: to_network_input(images, cfg, device), device=device,
        epoch=lambda: state.epoch,
    )  # fmt: skip
    torch.manual_seed(cfg.experiment.seed)  # the same initial weights on every rank
    backbone = build_model(cfg)
    if cfg.model.pretrained:
        load_pretrained(cfg, backbone)
    objective = objective_cls(cfg, backbone, data, **cfg.objective.params)
    backbone = backbone.to(device)
    if cfg.model.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    objective = objective.to(device)
    model = objective.network(backbone)
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
    optimizer = build_optimizer(cfg.optim, [backbone, *objective.parameter_modules()])
    total_steps = sampler.steps_per_epoch * cfg.train.epochs
    scheduler = build_scheduler(optimizer, cfg.schedule, sampler.steps_per_epoch, total_steps)
    scaler = torch.amp.GradScaler(device.type, growth_interval=100) if cfg.model.precision == "fp16" else None
    return Run(
        cfg=cfg, device=device, out=Path(cfg.output_dir), dataset=dataset, sampler=sampler, backbone=backbone,
        objective=objective, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        total_steps=total_steps, val_paths=val_set_paths(cfg), state=state,
        ema=build_ema(cfg.train.ema, backbone, device),
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
        [run.cfg.experiment.seed, get_rank(), run.state.step]
    ).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(other_seed))
    random.seed(int(other_seed))


def network_input(run: Run, images: torch.Tensor) -> torch.Tensor:
    return to_network_input(images, run.cfg, run.device)


class MicroBatchLoss(NamedTuple):
    loss: torch.Tensor  # this rank's loss of the micro-batch (before the division by grad_accum)
    record: Any  # what the objective keeps of it for the end of the step
    finite: torch.Tensor  # whether the embeddings were finite (read only when the step goes bad)


def forward_loss(
    run: Run, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
) -> MicroBatchLoss:
    """The objective's loss of one micro-batch on the network's outputs."""
    outputs = run.model(network_input(run, images))
    embeddings = outputs if torch.is_tensor(outputs) else outputs[0]
    loss, record = run.objective.loss(outputs, labels, indices)
    return MicroBatchLoss(loss, record, torch.isfinite(embeddings).all())


def trained_modules(run: Run) -> list[nn.Module]:
    return [run.backbone, *run.objective.parameter_modules()]


def train_step(run: Run, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (NaN when skipped)."""
    seed_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    # BN statistics and head buffers as they were: a skipped step must not leave inf/NaN in them
    buffers = [b for m in trained_modules(run) for b in m.buffers()]
    saved = [b.detach().clone() for b in buffers]
    losses, records, finite = [], [], []
    for i, (images, labels, indices) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(run.model, "no_sync") else run.model.no_sync()
        with sync:
            result = forward_loss(run, images, labels, indices)
            loss = result.loss / len(micro_batches)
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        losses.append(loss.detach())
        records.append(result.record)
        finite.append(result.finite)
    total = float(torch.stack(losses).sum())
    # The one guard: non-finite embeddings and logits reach the loss (Partial FC lets them through, on every
    # rank alike), and BN statistics or head buffers can overflow while the loss is still finite.
    floats = [b.detach().reshape(-1).float() for b in buffers if b.is_floating_point()]
    buffers_finite = not floats or bool(torch.isfinite(torch.cat(floats)).all())
    state = run.state
    if any_rank(not (math.isfinite(total) and buffers_finite)):
        run.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, old in zip(buffers, saved, strict=True):
                buffer.copy_(old)
        state.bad_steps += 1
        state.skipped_steps += 1
        if state.bad_steps >= run.cfg.train.max_bad_steps:
            embeddings_finite = all(bool(f) for f in finite)
            raise TrainingError(diverged(run, total, buffers_finite, embeddings_finite, micro_batches[-1][1]))
        run.scheduler.step()
        return math.nan
    state.bad_steps = 0
    scale = run.scaler.get_scale() if run.scaler else 1.0
    run.objective.after_good_step(
        records, StepContext(step=state.step, backbone=run.backbone, loss_scale=scale)
    )
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.objective.clip_parameters(run.backbone), run.cfg.optim.grad_clip)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        # Each rank averages its own backbone. DDP keeps its parameters equal on every rank (the same summed
        # gradient, the same optimizer step) and a step is skipped on all ranks or none, so the averaged
        # parameters stay equal with no collective. BN statistics are rank 0's, broadcast by DDP at each
        # forward, plus this rank's batch: they differ across ranks by as much as the raw backbone's do.
        run.ema.after_step(run.backbone, state.step + 1)
    return total


def diverged(
    run: Run, total: float, buffers_finite: bool, embeddings_finite: bool, labels: torch.Tensor
) -> str:
    """Why the run stops after ``train.max_bad_steps`` skipped steps in a row: the step, what was not
    finite, and the last checkpoint written (every one is finite: :func:`save` checks)."""
    if not math.isfinite(total):
        what = f"loss is {total}"
    elif not buffers_finite:
        what = f"BN statistics or head buffers are not finite (loss {total:.4g})"
    else:
        what = "the loss or buffers of another rank are not finite"
    embeddings = "" if embeddings_finite else "the embeddings hold NaN or inf; "
    state = run.state
    return (
        f"step {state.step}: {what} for {state.bad_steps} steps in a row ({embeddings}train.max_bad_steps "
        f"{run.cfg.train.max_bad_steps}; labels of the last batch begin {labels[:16].tolist()}): if the run "
        f"diverged, lower optim.lr or set optim.grad_clip; last good checkpoint: "
        f"{state.last_checkpoint or 'none written yet'}"
    )


def train_mode(run: Run) -> None:
    run.objective.train_mode(run.backbone)


def epoch_loader(run: Run) -> Iterable[Any]:
    """The micro-batches of epoch ``run.state.epoch`` from step ``run.state.step_in_epoch`` on; a bad record
    stops the run or is replaced and counted (``data.bad_records``), whatever the number of workers."""
    run.sampler.set_epoch(run.state.epoch, run.state.step_in_epoch)
    return run.dataset.loader(run.sampler, run.cfg.data.num_workers, pin_memory=run.device.type == "cuda")


def micro_batch_groups(loader: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def train_one_epoch(run: Run, log: Logbook, limit: int) -> None:
    """Run epoch ``run.state.epoch`` from ``run.state.step_in_epoch`` on, validating and saving as
    configured, until the epoch ends or ``run.state.step`` reaches ``limit``."""
    cfg, state = run.cfg, run.state
    loader = epoch_loader(run)
    train_mode(run)
    window_loss, window_good, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
    for micro_batches in micro_batch_groups(loader, cfg.optim.grad_accum):
        loss = train_step(run, micro_batches)
        state.step += 1
        state.step_in_epoch += 1
        window_steps += 1
        if math.isfinite(loss):
            window_loss, window_good = window_loss + loss, window_good + 1
        rate = window_steps * run.sampler.global_batch / max(1e-9, time.perf_counter() - window_start)
        lr = run.optimizer.param_groups[0]["lr"]
        log.progress(1, {"loss": f"{loss:.3f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}"})
        if state.step % cfg.train.log_every == 0 or state.step == limit:
            elapsed = time.perf_counter() - window_start
            report(run, log, window_loss / window_good if window_good else math.nan, window_steps, elapsed)
            window_loss, window_good, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
        if state.step == limit or state.step == run.total_steps:
            break  # fit() validates and saves the end
        validate_now = bool(cfg.train.val_every) and state.step % cfg.train.val_every == 0
        save_now = bool(cfg.train.save_every) and state.step % cfg.train.save_every == 0
        best = validate_now and validate_and_log(run, log)
        if best or save_now:
            save(run, log, best=best)
        if validate_now or save_now:
            window_start = time.perf_counter()  # images/s counts training, not validation or saving
    if state.step_in_epoch == run.sampler.steps_per_epoch:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0


def report(run: Run, log: Logbook, loss: float, steps: int, elapsed: float) -> None:
    images = steps * run.sampler.global_batch
    values = {
        "train/loss": loss,
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "train/images_per_s": images / elapsed if elapsed > 0 else 0.0,
        "train/skipped_steps": float(run.state.skipped_steps),
    }
    if run.scaler:
        values["train/grad_scale"] = float(run.scaler.get_scale())
    bad_records = run.dataset.bad_records
    if bad_records.mode == "skip":
        values["data/bad_records"] = float(bad_records.count)
        for problem in bad_records.take_unlogged():
            log.line(f"bad record, trained on another image of its identity instead: {problem}")
    values.update(run.objective.log_scalars())
    log.scalars(run.state.step, values)
    text = " ".join(f"{k.split('/')[1]} {v:.5g}" for k, v in values.items())
    log.line(f"epoch {run.state.epoch} step {run.state.step}/{run.total_steps} {text}")


# --------------------------------------------------------------------------------------- evaluate


def evaluate(
    run: Run, model: nn.Module | None = None, device: torch.device | None = None
) -> dict[str, dict[str, float]]:
    """10-fold accuracy (docs/methods.md §5.2, flip-sum fusion) on every validation set, of ``model`` on
    ``device`` (default: the backbone on the training device; the average of ``train.ema`` where it lives).
    Every rank embeds its share of the images and receives all features, so no rank waits on another past
    the collective timeout."""
    model, device = (run.backbone, run.device) if model is None else (model, device or run.device)
    embedder = TorchEmbedder(model, run.cfg.data.color, device, run.cfg.model.channels_last)
    results = {}
    for val in run.val_sets:
        original, flipped = extract(embedder, val.images, run.cfg.train.val_batch_size, flip=True, shard=True)
        results[val.name] = verification_results(original, flipped, val.issame, "sum")
    train_mode(run)
    return results


def validate_and_log(run: Run, log: Logbook) -> bool:
    """Evaluate the backbone (TensorBoard ``val/``) and, with ``train.ema``, its average beside it
    (``val_ema/``, the log line's ``ema`` part); tell whether this is the best result so far (by
    ``train.best_metric`` of the weights ``train.ema.select_best`` names)."""
    if not run.val_sets:
        return False
    state = run.state
    state.validation = evaluate(run)
    columns = [("val", "", state.validation)]
    if run.ema is not None:
        state.ema_validation = evaluate(run, run.ema.module, run.ema.device)
        columns.append(("val_ema", "ema ", state.ema_validation))
    shown = ("accuracy", "accuracy_std", "val_at_far_1e-3", "feature_norm")
    texts = []
    for section, label, results in columns:
        for name, metrics in results.items():
            log.scalars(state.step, {f"{section}/{name}_{key}": metrics[key] for key in shown})
        mean = float(np.mean([m["accuracy"] for m in results.values()]))
        log.scalars(state.step, {f"{section}/mean_accuracy": mean})
        table = " ".join(
            f"{n} {m['accuracy'] * 100:.2f}±{m['accuracy_std'] * 100:.2f}" for n, m in results.items()
        )
        texts.append(f"{label}{table} mean {mean * 100:.2f}")
    log.line(f"validation step {state.step}: {'; '.join(texts)}")
    results = state.ema_validation if run.cfg.train.ema.select_best == "ema" else state.validation
    mean = float(np.mean([m["accuracy"] for m in results.values()]))
    metric = mean if run.cfg.train.best_metric == "mean" else results[run.cfg.train.best_metric]["accuracy"]
    if metric > state.best:
        state.best = metric
        return True
    return False


# ------------------------------------------------------------------------------------ save/resume


def checkpoint_state(run: Run) -> dict[str, Any]:
    """The checkpoint dict (DESIGN.md), assembled from the parts' own state: every rank must call it (an
    objective may gather shards)."""
    return {
        "config": config_to_dict(run.cfg),
        "backbone": run.backbone.state_dict(),
        **run.objective.state_dict(),  # the objective's entries: head, uncertainty, difficulty
        "optimizer": run.objective.optimizer_state_dict(run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        **run.state.state_dict(),  # step, epoch, sampler, train, validation
        **ema_entry(run),  # the average of train.ema, absent when it is off
        "meta": {**backbone_meta(run.cfg), **run.objective.meta()},
    }


def ema_entry(run: Run) -> dict[str, Any]:
    """The checkpoint's ``ema`` entry (the average's weights, its update count and its latest validation
    results), or nothing when ``train.ema`` is off, so checkpoints without it keep their layout."""
    if run.ema is None:
        return {}
    return {"ema": {**run.ema.state_dict(), "validation": run.state.ema_validation}}


def save(run: Run, log: Logbook, best: bool = False) -> None:
    """Write ``step_N.pt`` (and point last.pt/best.pt at it) on rank 0. A state holding NaN or inf anywhere
    (weights, BN statistics, head buffers, optimizer state) is not written: the run stops, naming the
    tensor and the last good checkpoint, which stays as it was."""
    state = checkpoint_state(run)  # a collective: every rank takes part, rank 0 writes
    step = run.state.step
    target = run.out / f"step_{step}.pt"

    def write() -> None:
        bad = nonfinite_entry(state)
        if bad is not None:
            raise TrainingError(
                f"step {step}: {target.name} not written: {bad} holds NaN or inf (the run diverged: "
                f"lower optim.lr or set optim.grad_clip); last good checkpoint: "
                f"{run.state.last_checkpoint or 'none written yet'}"
            )
        save_step_checkpoint(run.out, step, state, run.cfg.train.keep_last, best)

    on_rank0(write, f"write {target}")
    run.state.last_checkpoint = target
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
    """Continue from checkpoint ``path``: weights, the objective's state, optimizer, schedule, scaler,
    position. Everything is checked before anything is loaded (:func:`check_resumable`). Settings changed
    since the checkpoint take effect from the resumed step, the optimizer's included: its state (momentum,
    moments) is the checkpoint's, its hyperparameters and base learning rate this run's, the schedule's
    factor taken at the resumed step. Returns the line to log."""
    # memory-mapped: each part copies what it takes (a rank only its block of Partial FC centres and their
    # optimizer state), so no rank reads the whole unsharded head into memory
    state = load_checkpoint(path, map_location="cpu", mmap=True)
    check_resumable(run, path, state)
    old = config_to_dict(config_from_dict(state["config"], source=str(path)))
    changed = [f"{s}.{k} {old.get(s, {}).get(k)!r} -> {v[k]!r}"
               for s, v in config_to_dict(run.cfg).items() if isinstance(v, dict)
               for k in v if old.get(s, {}).get(k) != v[k]]  # fmt: skip
    run.backbone.load_state_dict(state["backbone"])
    changed += run.objective.load_state_dict(state)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    base_lrs = list(run.scheduler.base_lrs)
    run.objective.load_optimizer_state_dict(run.optimizer, state["optimizer"])
    copy_mapped_optimizer_state(run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scheduler.base_lrs = base_lrs
    step = run.scheduler.last_epoch
    lrs = [base * factor(step) for factor, base in zip(run.scheduler.lr_lambdas, base_lrs, strict=True)]
    for group, ours, lr in zip(run.optimizer.param_groups, settings, lrs, strict=True):
        group.update(ours, lr=lr)
    run.scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.state.load_state_dict(state)
    run.state.last_checkpoint = path
    note = f"resumed {path} at epoch {run.state.epoch} step {run.state.step}"
    if changed:
        note += f"; changed since the checkpoint, applied from step {run.state.step}: {', '.join(changed)}"
    ema_note, run.state.ema_validation = resume_ema(run.ema, state.get("ema"), run.backbone)
    return note + ema_note


def check_resumable(run: Run, path: Path, state: dict[str, Any]) -> None:
    """Refuse, in one line naming ``path``, the setting and both values, a checkpoint this run cannot
    continue: no training state, another global batch or seed, a checkpoint of another objective, a model
    or optimizer of another shape (architecture, embedding or input size, colour order, the objective's
    settings such as head and class count, optimizer, parameter groups), or objective state that does not
    fit (:meth:`Objective.check_state_fits`)."""
    missing = [key for key in ("optimizer", "sampler", "head", "scheduler") if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: holds no {', '.join(missing)}: a weights-only checkpoint cannot be resumed"
        )
    sampler, cfg = state["sampler"], run.cfg
    if sampler["global_batch"] != run.sampler.global_batch:
        raise CheckpointError(
            f"{path}: trained with a global batch of {sampler['global_batch']} images, this run has "
            f"{run.sampler.global_batch} ({cfg.data.batch_size} per process x {get_world_size()} "
            f"processes x {cfg.optim.grad_accum} accumulated); set data.batch_size or optim.grad_accum "
            "so they match"
        )
    if sampler["seed"] != cfg.experiment.seed:
        raise CheckpointError(
            f"{path}: trained with seed {sampler['seed']}, this run has {cfg.experiment.seed}"
        )
    run.objective.check_resumable(state, path)
    backbone = saved_backbone_settings(cfg, state.get("meta", {}))
    wrong = mismatched([*backbone, *run.objective.resume_settings(state)], known_only=True)
    if wrong:
        hint = ""
        if not mismatched(backbone, known_only=True):
            hint = f" (to start from its backbone: a new run with model.pretrained={path})"
        raise CheckpointError(f"{path}: trained with {wrong}, or start a new output_dir{hint}")
    old_optim = state.get("config", {}).get("optim", {}).get("name")
    if old_optim is not None and old_optim != cfg.optim.name:
        raise CheckpointError(
            f"{path}: trained with optim.name {old_optim!r} (this run: {cfg.optim.name!r}): its "
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
    check_fits(path, [("backbone", state["backbone"], run.backbone.state_dict(), "model.backbone",
                       cfg.model.backbone)])  # fmt: skip
    if run.ema is not None and state.get("ema") is not None:
        check_fits(path, [("train.ema average", state["ema"]["backbone"], run.ema.module.state_dict(),
                           "model.backbone", cfg.model.backbone)])  # fmt: skip
    run.objective.check_state_fits(state, path)


# ------------------------------------------------------------------------------------------- main


def fit(
    cfg: Config, resume_from: str = "", device: torch.device | None = None, overwrite: bool = False
) -> Run:
    """Build, resume if asked, train to the end (or ``train.max_steps``), validate and save.

    Nothing is written before every check has passed (the config, the data, the checkpoint to resume
    and its fit with this run, the output folder), so a refused run leaves ``output_dir`` as it was.
    ``overwrite`` starts in a folder holding another run's checkpoints, after moving them aside."""
    device = device or init_distributed(cfg.train.collective_timeout_s, cfg.train.launcher_watch_s)
    if cfg.model.freeze_backbone and not cfg.model.pretrained:  # (a dry run may step a random one)
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
    on_rank0(lambda: check_output_dir(run.out, path, run.state.step, overwrite), f"use output_dir {run.out}")
    # the first write: every check has passed
    stale, aside = on_rank0(lambda: start_output_dir(run, overwrite), f"prepare {run.out}") or ([], None)
    if aside is not None and path is not None and path.parent == run.out:
        run.state.last_checkpoint = aside / path.name
    spill.use_directory(run.out)  # a checkpoint's large gathered tensors (Partial FC) live in files there
    log = on_rank0(
        lambda: Logbook(run.out, run.total_steps, start_step=run.state.step), f"open {run.out / 'train.log'}"
    ) or Logbook(run.out, run.total_steps, enabled=False)
    try:
        if aside is not None:
            log.line(f"--overwrite: the files of the run that was here were moved to {aside}")
        if stale:
            log.line(f"removed {len(stale)} partial files of interrupted writes: {[p.name for p in stale]}")
        if note:
            log.line(note)
        log.line(
            f"{cfg.model.backbone} + {run.objective.describe()}: {run.dataset.num_images} images, "
            f"{run.dataset.num_identities} classes, {get_world_size()} processes, global batch "
            f"{run.sampler.global_batch}, {run.sampler.steps_per_epoch} steps/epoch, {run.total_steps} steps"
        )
        if run.ema is not None:
            log.line(describe_ema(run.ema, cfg.train.ema, cfg.model.freeze_backbone))
        limit = min(run.total_steps, cfg.train.max_steps or run.total_steps)
        while run.state.step < limit:
            train_one_epoch(run, log, limit)
        best = validate_and_log(run, log)
        save(run, log, best=best)
        barrier()
        if run.dataset.bad_records.count:
            log.line(run.dataset.bad_records.summary())
    except BaseException as err:
        failure = collective_error(err, step=run.state.step)  # another rank stopped or died: say which, where
        log.stopped(stop_reason(failure or err))  # train.log says why the run ended, not only the console
        if failure is not None and failure is not err:
            raise failure from err
        raise
    finally:
        log.close()
        spill.use_directory(None)
    return run


def start_output_dir(run: Run, overwrite: bool) -> tuple[list[Path], Path | None]:
    """Rank 0's first writes (:func:`core.run_dir.prepare_output_dir`), then the resolved config."""
    stale, aside = prepare_output_dir(run.out, overwrite)
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
        run.state.step += 1
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        run.backbone.eval()
        embedding = run.backbone(network_input(run, micro_batches[0][0]))
    return {
        "backbone": cfg.model.backbone,
        "parameters_M": round(sum(p.numel() for p in run.backbone.parameters()) / 1e6, 3),
        "head": cfg.head.name,
        "objective": run.objective.describe(),
        "objective_parameters_M": round(
            sum(q.numel() for m in run.objective.parameter_modules() for q in m.parameters()) / 1e6, 3
        ),
        "trainable_parameters_M": round(
            sum(q.numel() for group in run.optimizer.param_groups for q in group["params"]) / 1e6, 3
        ),
        "embedding": list(embedding.shape),
        "classes": run.dataset.num_identities,
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
