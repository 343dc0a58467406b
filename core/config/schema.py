"""The config schema: one dataclass per section, each field with its type, default and bounds. This is
where a key is added; :mod:`core.config` reads files into it and checks them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from core.config.bounds import PROBABILITY, bounded, limits
from core.config.yamlfile import locate

# Defaults follow insightface arcface_torch (MS1MV2, r50, ArcFace, SGD) unless a comment says otherwise.


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = bounded(2048, min=0)


@dataclass
class AugmentConfig:
    """Probability of each augmentation (docs/methods.md §1.4). arcface_torch: flip only; AdaFace: 0.2 for
    the rest."""

    flip: float = bounded(0.5, **PROBABILITY)
    crop: float = bounded(0.0, **PROBABILITY)
    low_res: float = bounded(0.0, **PROBABILITY)
    photometric: float = bounded(0.0, **PROBABILITY)
    jitter: float = bounded(0.0, **PROBABILITY)
    # Synthetic face mask on the lower face (data.masks), drawn before the other augmentations: its
    # probability, the types drawn uniformly (surgical, n95, cloth, overlay) and, for ``overlay``, the folder
    # of the photographed masks (mask_<colour>.jpg, as in insightface's package data).
    mask: float = bounded(0.0, **PROBABILITY)
    mask_types: list[str] = field(default_factory=lambda: ["surgical", "n95", "cloth"])
    mask_overlays: str = ""


@dataclass
class DataConfig:
    # RecordIO: a .rec file, its prefix (x for x.rec/x.idx) or a folder holding train.rec/train.idx;
    # folder: root/<identity>/<img>. ``auto`` takes a RecordIO when root names one, else the folder.
    root: str = ""
    format: Literal["auto", "rec", "folder"] = "auto"
    # Colour order the network sees; a checkpoint records it (insightface rgb, AdaFace bgr).
    color: Literal["rgb", "bgr"] = "rgb"
    image_size: int = bounded(112, min=1)  # side of the stored faces, checked against the data
    batch_size: int = bounded(128, min=1)  # per process
    num_workers: int = bounded(2, min=0)
    # Read from the data when left empty; a value given here is checked against the data.
    num_classes: int | None = bounded(None, min=1)
    num_images: int | None = bounded(None, min=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Batch order: ``random`` (every image once per epoch, shuffled) or ``pk`` (docs/methods.md §3.10:
    # every micro-batch holds batch_size / pk_k identities x pk_k images, each identity once per epoch,
    # its images repeated when it has fewer than pk_k).
    sampler: Literal["random", "pk"] = "random"
    pk_k: int = bounded(4, min=1)
    # A training image that cannot be read or decoded, or is not image_size x image_size: ``stop`` ends the
    # run with one line naming it; ``skip`` trains on another image of its identity in its place and counts
    # it (train.log), stopping once more than ``max_bad_records`` distinct records have failed.
    bad_records: Literal["stop", "skip"] = "stop"
    max_bad_records: int = 100
    # Verification .bin sets evaluated during training, looked up in val_root.
    val_root: str = ""
    val_targets: list[str] = field(
        default_factory=lambda: ["lfw", "cfp_fp", "agedb_30"], metadata=limits(unique=True)
    )


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = bounded(512, min=1)
    dropout: float = bounded(0.0, min=0.0, below=1.0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    grad_checkpoint: bool = False
    channels_last: bool = False
    compile: bool = False
    # Side of the network's input; empty = data.image_size. Faces are stored and augmented at
    # data.image_size and resized to this on the device (a smaller input trains faster on CPUs).
    input_size: int | None = bounded(None, min=1)
    # Initial backbone weights from a checkpoint of this framework (same arch, embedding size, input size
    # and colour); empty: random initialisation.
    pretrained: str = ""
    # Keep the backbone as loaded (no gradient, BN and dropout in inference mode), e.g. for ProbFace.
    freeze_backbone: bool = False
    # ProbFace uncertainty module on the backbone's last feature map (docs/methods.md §3.11):
    # none | scalar | per_dim.
    uncertainty: Literal["none", "scalar", "per_dim"] = "none"
    # Momentum of its BatchNorms (PyTorch's convention, the batch's share): ProbFace's 0.005 (TensorFlow
    # decay 0.995) suits its 12,000 steps; a run of a few hundred steps needs a larger one, e.g. 0.1.
    uncertainty_bn_momentum: float = 0.005
    # DDP: static graph (a fixed set of used parameters), gradient bucket size, fp16 gradient all-reduce.
    ddp_static_graph: bool = True
    ddp_bucket_mb: int = bounded(25, min=1)
    ddp_fp16_grads: bool = False


@dataclass
class ObjectiveConfig:
    """The way of training, by registry name (``objectives/``): ``classification`` (Partial FC over a margin
    head, a loss on the per-sample cross-entropy), ``metric`` (a loss on the embeddings of PK batches),
    ``probface`` (an uncertainty module on a frozen backbone), or a registered one of the user's.
    ``auto`` takes it from the other sections: head.name none with model.uncertainty is probface,
    head.name none metric, any head classification. ``params`` go to its constructor."""

    name: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadConfig:
    """Margin head by registry name. ``params`` go to its constructor (checked against its signature when
    the head is built), so a head's own defaults apply: CosFace m 0.4, ArcFace m 0.5, AdaFace m 0.4, ...
    ``none``: no classifier; the loss is computed on the embeddings (``triplet``, ``probface``)."""

    name: str = "arcface"
    params: dict[str, Any] = field(default_factory=dict)
    # Partial FC: fraction of negative class centres sampled per step (1.0 = all).
    sample_rate: float = bounded(1.0, above=0.0, max=1.0)
    # Partial FC inter-class filtering (arcface_torch): non-target cosines above this are zeroed as likely
    # label-noise duplicates of the sample's identity; 0 = off (arcface_torch's default; 0.4 on noisy data).
    interclass_filtering_threshold: float = bounded(0.0, min=0.0, below=1.0)


@dataclass
class LossConfig:
    """Loss on the per-sample cross-entropy of the head's logits (cross_entropy, focal, frabsm_weight), or
    with ``head.name: none`` on the embeddings (triplet: ``params`` margin, mining; probface).
    ``params`` go to its constructor; ``class_weights: inverse_log_frequency`` weights classes by
    1 / log(1 + images of the class), computed from the data."""

    name: str = "cross_entropy"
    params: dict[str, Any] = field(default_factory=dict)
    class_weights: Literal["none", "inverse_log_frequency"] = "none"


@dataclass
class MiningConfig:
    """Per-image difficulty scores (docs/methods.md §3.8): an EMA of each image's target cosine, identical on
    every rank, saved with checkpoints (the closeness-diversity method's stage 1 tracks them for
    stage 2)."""

    difficulty: bool = False
    momentum: float = bounded(0.9, **PROBABILITY)
    # Closeness-diversity stage 2: every cd_interval steps (0: never) a mined batch of cd_classes classes
    # (over all ranks) x (cd_easy easy + cd_hard hard images) adds W_C closeness + W_D diversity, the
    # prototypes being the centres of the classes' cd_negatives hardest negative classes.
    cd_interval: int = bounded(0, min=0)
    cd_classes: int = bounded(64, min=1)
    cd_easy: int = bounded(7, min=2)  # closeness needs 2 images of a class
    cd_hard: int = bounded(1, min=1)
    cd_negatives: int = bounded(500, min=1)
    cd_weight_closeness: float = bounded(0.5, min=0.0)
    cd_weight_diversity: float = bounded(1.0, min=0.0)
    cd_percentile: float = bounded(0.2, **PROBABILITY)
    cd_scale: float = bounded(64.0, above=0.0)
    # Whose top negatives make the prototypes: the last sample of each selected class in the rank's batch
    # (the method's released code) or all of its samples (more prototypes when a class repeats).
    cd_prototypes: Literal["last", "all"] = "last"


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(
        0.1, above=0.0
    )  # for a global batch of 1024 (insightface); scale linearly with the batch
    momentum: float = bounded(0.9, min=0.0, below=1.0)
    nesterov: bool = False
    weight_decay: float = bounded(5e-4, min=0.0)
    # Weight decay of BN parameters and biases (AdamW recipes usually use 0).
    no_decay_bn_bias: bool = False
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata=limits(length=2, min=0.0, below=1.0)
    )
    grad_clip: float = bounded(5.0, min=0.0)  # max global grad norm; 0 disables
    grad_accum: int = bounded(1, min=1)
    # Layer-wise lr decay: a backbone's layer i of L (ViTs: 0 the embeddings, i + 1 block i, L the head) takes
    # lr * layer_decay^(L - i); other modules the full lr. 1 switches it off.
    layer_decay: float = bounded(1.0, above=0.0, max=1.0)


@dataclass
class ScheduleConfig:
    name: Literal["polynomial", "multistep", "cosine"] = "polynomial"
    warmup_epochs: float = bounded(0.0, min=0.0)
    power: float = bounded(1.0, min=0.0)  # polynomial decay exponent (arcface_torch PolynomialLRWarmup: 1)
    # Epochs, multistep only.
    milestones: list[float] = field(default_factory=list, metadata=limits(min=0.0, increasing=True))
    gamma: float = bounded(0.1, above=0.0)
    min_lr: float = bounded(0.0, min=0.0)


@dataclass
class EmaConfig:
    """An exponential moving average of the backbone's weights (``objectives.ema``), validated beside the
    trained weights and saved in the checkpoint's ``ema`` entry. After every ``every``-th optimizer step
    that counts, update n: ema <- d ema + (1 - d) weights, d = 0 for the first update, then ``decay``
    (``warmup: none``), min(decay, 1 - n^-warmup_power) (``power``, timm's ModelEmaV3) or
    min(decay, (1 + n) / (10 + n)) (``tf``). Floating-point buffers (BN statistics) are averaged too."""

    enabled: bool = False
    decay: float = bounded(0.9998, min=0.0, below=1.0)
    warmup: Literal["none", "power", "tf"] = "power"
    warmup_power: float = bounded(2 / 3, above=0.0, max=1.0)
    every: int = bounded(1, min=1)  # optimizer steps between updates
    # Where the average lives: the training device, or the CPU (saves accelerator memory).
    device: Literal["device", "cpu"] = "device"
    # The weights whose validation result picks best.pt (train.best_metric): the trained ones or the average.
    select_best: Literal["raw", "ema"] = "raw"


@dataclass
class TrainConfig:
    epochs: int = bounded(20, min=1)
    log_every: int = bounded(50, min=1)  # steps between log lines / TensorBoard scalars
    val_every: int = bounded(2000, min=0)  # steps between validations (0: only at the end)
    val_batch_size: int = bounded(256, min=1)
    save_every: int = bounded(
        2000, min=0
    )  # steps between checkpoints, 0: none (a final one is always written)
    keep_last: int = bounded(3, min=1)
    # Validation result that picks best.pt: a .bin name (``lfw``), or ``mean`` over val_targets.
    best_metric: str = "mean"
    # A non-finite loss skips the step; this many in a row abort the run.
    max_bad_steps: int = bounded(5, min=1)
    # Stop after this many optimizer steps (0: run all epochs); the schedule is unchanged.
    max_steps: int = bounded(0, min=0)
    # Seconds a rank waits in a collective for the others (a stopped or dead rank) before the run stops
    # naming the operation and the rank; $FACEREC_COLLECTIVE_TIMEOUT_S overrides it. It must exceed the
    # longest time one rank works alone (rank 0 writing a checkpoint).
    collective_timeout_s: float = bounded(1800.0, above=0.0)
    # Under torchrun: seconds between checks that the launcher is alive; a rank whose launcher is gone
    # stops (0: no check).
    launcher_watch_s: float = bounded(5.0, min=0.0)
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class CustomImportsConfig:
    """The user's own code (MMEngine's ``custom_imports``, :mod:`core.plugins`): Python files (relative to
    the config file that names them, or absolute) or module names, imported by :func:`load_config` before
    anything is built, so the parts they register are usable by name. A plain list is short for
    ``imports``; ``allow_failed_imports`` warns about an entry that does not import instead of stopping."""

    imports: list[str] = field(default_factory=list)
    allow_failed_imports: bool = False


@dataclass
class Config:
    # Checkpoints, config.yaml, train.log and TensorBoard files of the run go here.
    output_dir: str = bounded("work_dirs/default", nonempty=True)
    custom_imports: CustomImportsConfig = field(default_factory=CustomImportsConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where each dotted key was set (FILE line N, or the --set argument); load_config fills it.
    _origins: ClassVar[dict[str, str]] = {}

    def origin(self, key: str) -> str:
        """Where the value of dotted ``key`` was set: ``FILE line N``, ``--set KEY=VALUE``, or ``""`` (a
        default, or a config that :func:`load_config` did not read)."""
        return locate(self._origins, key)
