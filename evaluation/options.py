"""The command-line options the evaluators share, spelled one way, and the settings they report.

One spelling per concept, with the forms users of insightface's and AdaFace's scripts type kept as aliases
(docs/evaluation.md lists them):

============================  =================  ==========================================================
concept                       option             aliases
============================  =================  ==========================================================
the benchmark's folder        ``--data-root``    ``--data_root`` (AdaFace); per evaluator its older name:
                                                 ``--bin-dir``, ``--ijb-root`` and ``--image-path``
                                                 (insightface), ``--root``
.bin files                    ``--bins``,        each accepts the other (``validation_hq.evaluate`` takes
                              ``--bin``          ``--bins``; the one-set tools ``--bin``)
model file                    ``--model``        ``--model-prefix`` (insightface)
architecture of a state dict  ``--backbone``     ``--network`` (insightface)
images per forward pass       ``--batch-size``   ``--batch_size`` (AdaFace)
loader workers / threads      ``--workers``      ``--num_workers`` (AdaFace)
flip fusion                   ``--fusion``       ``--fusion_method`` (AdaFace, with its fusion names)
feature cache folder          ``--cache``        ``--features`` (MegaFace)
IJB dataset                   ``--dataset``      ``--dataset_name`` (AdaFace; IJBB, IJBC read as ijbb, ijbc)
IJB output folder             ``--out``          ``--result-dir`` (insightface)
============================  =================  ==========================================================
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from backbones.common import PRECISIONS
from core.checkpoint import NORMALIZATION
from core.threads import use_threads
from evaluation.embedders import OnnxEmbedder, TorchEmbedder, load_embedder
from evaluation.verification import FUSIONS

# AdaFace's names for the flip fusions, accepted so its command lines keep working.
ADAFACE_FUSIONS = {
    "pre_norm_vector_add": "sum",
    "norm_weighted_avg": "norm_weighted",
    "average": "unit_mean",
}


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_embedder_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every evaluator takes: ``--model --backbone --color --device --precision``
    ``--input-mean --input-std --use-ema``."""
    parser.add_argument("--model", "--model-prefix", type=Path, required=True,
                        help="checkpoint, insightface model.pt, AdaFace .ckpt or .onnx")  # fmt: skip
    parser.add_argument(
        "--backbone", "--network", help="architecture of a plain state dict (r50, r100, mbf, ...)"
    )
    parser.add_argument(
        "--color", choices=("rgb", "bgr"), help="colour order the model expects (default: its own)"
    )
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 (default: %(default)s)")
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32",
        help="autocast of a PyTorch model; bf16/fp16 are faster on GPU (default: fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--input-mean", type=float, metavar="M",
        help="ONNX models: feed (pixels - M) / S (0..255 pixels); default: read from the model "
             "(its normalization metadata, a Sub/Mul head = 0 and 1), else 127.5 and 127.5",
    )  # fmt: skip
    parser.add_argument("--input-std", type=float, metavar="S", help="ONNX models: S of --input-mean")
    parser.add_argument(
        "--use-ema", action="store_true",
        help="a checkpoint's average of the weights kept with train.ema instead of its trained weights "
        "(timm's flag); default: the trained weights",
    )  # fmt: skip


def embedder_from_args(args: argparse.Namespace) -> TorchEmbedder | OnnxEmbedder:
    """The embedder named by the options of :func:`add_embedder_arguments`; the evaluator's extraction
    runs on ``core.threads.thread_count()`` threads from here on (chosen before it adds to the load)."""
    use_threads("batched")
    return load_embedder(
        args.model, args.backbone, args.color, args.device, args.precision,
        getattr(args, "input_mean", None), getattr(args, "input_std", None),
        "ema" if getattr(args, "use_ema", False) else "raw",
    )  # fmt: skip


def add_data_root_argument(
    parser: argparse.ArgumentParser, *aliases: str, help: str, required: bool = True
) -> None:
    """``--data-root`` (``args.data_root``): the benchmark's folder; ``aliases`` are the evaluator's older
    spellings (``--bin-dir``, ``--ijb-root``, ...). ``--data_root`` is accepted everywhere."""
    names = ("--data-root", "--data_root", *aliases)
    parser.add_argument(*names, dest="data_root", type=Path, required=required, metavar="DIR", help=help)


def fusion_name(value: str) -> str:
    """A flip fusion of ours from its name or AdaFace's (``pre_norm_vector_add`` is ``sum``, ...)."""
    return ADAFACE_FUSIONS.get(value, value)


def add_fusion_argument(parser: argparse.ArgumentParser) -> None:
    """``--fusion`` (``--fusion_method``): how an image's and its flip's features are fused; AdaFace's names
    are read as ours."""
    parser.add_argument(
        "--fusion", "--fusion_method", type=fusion_name, choices=FUSIONS, default="sum",
        help=f"flip fusion, one of {', '.join(FUSIONS)} (none: no flip; AdaFace's "
             f"{', '.join(ADAFACE_FUSIONS)} are accepted) (default: sum)",
    )  # fmt: skip


def add_batch_arguments(
    parser: argparse.ArgumentParser,
    batch_size: int,
    workers: int | None = None,
    what: str = "loader processes",
) -> None:
    """``--batch-size`` (``--batch_size``) and, unless ``workers`` is None, ``--workers``
    (``--num_workers``) doing ``what`` (e.g. "loader processes decoding and aligning")."""
    parser.add_argument("--batch-size", "--batch_size", type=int, default=batch_size,
                        help="images per forward pass (default: %(default)s)")  # fmt: skip
    if workers is not None:
        parser.add_argument("--workers", "--num_workers", type=int, default=workers,
                            help=f"{what} (default: %(default)s)")  # fmt: skip


def add_cache_argument(parser: argparse.ArgumentParser, *aliases: str, help: str) -> None:
    """``--cache DIR`` (``args.cache``): the folder of :class:`evaluation.cache.FeatureCache`."""
    parser.add_argument("--cache", *aliases, dest="cache", type=Path, metavar="DIR", help=help)


def run_settings(
    args: argparse.Namespace, embedder: TorchEmbedder | OnnxEmbedder | None = None, **extra: object
) -> dict:
    """The switches behind an evaluator's numbers, for its printout and its JSON: the model, and the
    embedder's kind (``TorchEmbedder``, ``OnnxEmbedder``, ...), colour order, precision and input scaling
    (``normalization``; None without an embedder, e.g. re-scored features), the run's ``fusion``,
    ``batch_size`` and ``workers`` options where it has them, and ``extra``."""
    settings: dict = {"model": str(args.model)}
    if embedder is not None:
        settings |= {"embedder": type(embedder).__name__, "color": embedder.color,
                     "precision": embedder.precision,
                     "normalization": getattr(embedder, "normalization", NORMALIZATION)}  # fmt: skip
    else:
        settings["normalization"] = None
    if getattr(embedder, "weights", "raw") != "raw":
        # the checkpoint's average (train.ema), not its trained weights
        settings["weights"] = embedder.weights
    for name in ("fusion", "batch_size", "workers"):
        if hasattr(args, name):
            settings[name] = getattr(args, name)
    return settings | extra


def settings_line(settings: dict) -> str:
    """One line naming the switches of :func:`run_settings` that it holds."""
    parts = [f"{settings['color'].upper()} input"] if settings.get("color") else []
    if "fusion" in settings:
        parts.append(f"flip fusion {settings['fusion']}")
    if "batch_size" in settings:
        parts.append(f"batch {settings['batch_size']}")
    if settings.get("precision"):
        parts.append(settings["precision"])
    if "workers" in settings:
        parts.append(f"{settings['workers']} workers")
    if settings.get("weights"):
        parts.append(f"{settings['weights']} weights")
    return f"model {settings['model']}: {', '.join(parts)}"
