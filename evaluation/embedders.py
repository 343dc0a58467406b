"""Embedders from files: a checkpoint of ours, insightface or AdaFace weights, or an ONNX model.

An embedder maps a uint8 RGB batch (N, 3, 112, 112) to float32 features (N, D); each knows the colour order
and the input scaling its network expects and converts on the way in, so callers always hand over RGB
pixels. ``embedder.normalization`` names the scaling (stored beside every evaluator's numbers).

:func:`load_embedder` reads any of them; :func:`checkpoint_backbone` is the one way a checkpoint of this
framework becomes its backbone (ProbFace's embedder of ``probface.embedder`` builds on it), and weights of
other frameworks go through ``backbones.converters``.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones import build_backbone
from backbones.common import PRECISIONS, check_precision
from backbones.converters import ConversionError, from_adaface, from_insightface
from core.checkpoint import NORMALIZATION, checked_checkpoint, load_weights
from core.plugins import import_checkpoint_imports
from core.registry import UnknownNameError
from core.threads import thread_count
from data.transforms import normalize_batch
from evaluation.folding import TOLERANCE as FOLD_TOLERANCE
from evaluation.folding import fold_batchnorm, largest_difference, parameter_versions

DEFAULT_INPUT = (127.5, 127.5)  # (mean, std) of (x - mean) / std on pixels 0..255: NORMALIZATION
FOLD_PROBE_IMAGES = 4  # images of the first batch that find the foldable BatchNorms and check the fold
# A CPU forward pass takes at most this many images at once; a larger batch goes through in slices, with
# the same features. On 2 cores MobileFaceNet ran at 36 images/s in slices of 32 against 25 with 128 at
# once (whose activations, 100 MB a layer, miss the caches) and took 98 MiB of memory for a pass instead
# of 590 MiB (onnxruntime: 35 against 24 images/s, 98 against 393 MiB).
CPU_BATCH = 32
# The weights of a checkpoint to use: the trained ones (``backbone``) or their average (``ema``, train.ema).
WEIGHTS = ("raw", "ema")


class TorchEmbedder:
    """A backbone, put in eval mode; ``color`` is the order its network was trained on; ``channels_last``
    feeds the input in that memory format (for a model converted to it); ``input_size`` is the side its
    input is resized to (default: the model's ``input_size``, if it has one).

    ``precision`` runs the network under autocast: ``fp32`` (none), ``bf16`` or ``fp16``; the backbones keep
    their embedding layer (FC + BN) in fp32 under it, as in training. It applies on any device it is asked
    for (CPU autocast supports bf16), so a CPU run stays fp32 unless told otherwise.

    ``fast`` (default) runs an fp32 model on the CPU as a copy with its BatchNorms folded into the
    convolutions before them (:mod:`evaluation.folding`), built at the first call from its first images,
    checked against the model on them, and rebuilt whenever the model's weights change in place (a model
    still training); features equal the model's within float32 rounding. :attr:`fast_path` says what
    runs. A model in train mode, another device or precision, or ``fast=False`` runs as it is. On a CPU a
    batch goes through the network in slices of ``cpu_batch`` images (:data:`CPU_BATCH`).
    """

    normalization = NORMALIZATION
    weights = "raw"  # a checkpoint's trained weights, or "ema": their average (load_embedder sets it)

    def __init__(
        self,
        model: nn.Module,
        color: str = "rgb",
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        precision: str = "fp32",
        input_size: int | None = None,
        fast: bool = True,
    ) -> None:
        check_precision(precision)
        self.model, self.color, self.device = model.eval().to(device), color, torch.device(device)
        self.channels_last, self.precision = channels_last, precision
        self.input_size = input_size if input_size is not None else getattr(model, "input_size", None)
        self.fast, self.cpu_batch = fast, CPU_BATCH
        self.fast_path = "eager (not run yet)"
        self._folded: nn.Module | None = None
        self._folded_versions: tuple[int, ...] | None = None
        self._fold_failed = False

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB pixels -> the network's input on its device (colour order, size, normalisation)."""
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        x = normalize_batch(x, self.color, self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> AbstractContextManager:
        """The autocast of ``precision`` on the embedder's device (none for fp32)."""
        dtype = PRECISIONS[self.precision]
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def network(self, x: torch.Tensor) -> nn.Module:
        """The module that embeds the prepared batch ``x``: the BatchNorm-folded copy on the CPU path (see
        the class notes), else the model itself."""
        eligible = self.fast and self.device.type == "cpu" and self.precision == "fp32"
        if not eligible or self.model.training or self._fold_failed:
            self.fast_path = "eager"
            return self.model
        versions = parameter_versions(self.model)
        if self._folded is None or versions != self._folded_versions:
            self._fold(x[:FOLD_PROBE_IMAGES])
            self._folded_versions = versions
        return self.model if self._folded is None else self._folded

    def _fold(self, probe: torch.Tensor) -> None:
        self._folded = None
        try:
            folded, count = fold_batchnorm(self.model, probe)
            if count:
                difference = largest_difference(folded(probe), self.model(probe))
                if difference > FOLD_TOLERANCE:
                    raise ValueError(f"features differ from the model's by {difference:.2g} of their size")
                self._folded = folded
        except Exception as err:  # any model: the eager path is always there
            self._fold_failed = True
            self.fast_path = "eager"
            name = type(self.model).__name__
            print(f"{name}: BatchNorm folding left off, running the model as it is ({err})", file=sys.stderr)
            return
        total = sum(type(m) is nn.BatchNorm2d for m in self.model.modules())
        self.fast_path = f"BatchNorm folded ({count} of {total})" if count else "eager (nothing to fold)"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if self.device.type == "cpu" and len(images) > self.cpu_batch:  # in slices (see CPU_BATCH)
            step = self.cpu_batch
            return torch.cat([self(images[i : i + step]) for i in range(0, len(images), step)])
        x = self.prepare(images)
        with self.autocast():
            return self.network(x)(x).float().cpu()


@dataclass(frozen=True)
class InputScaling:
    """Network input ``(x - mean) / std`` of pixels ``x`` in 0..255, and why it was chosen."""

    mean: float
    std: float
    reason: str

    @property
    def description(self) -> str:
        if (self.mean, self.std) == DEFAULT_INPUT:
            return NORMALIZATION
        return f"(x - {self.mean:g}) / {self.std:g}"


def folded_normalization(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """The two nodes of a normalisation folded into the head of an ONNX graph, or None.

    insightface's model zoo (``ArcFaceONNX``) feeds raw pixels to a model when its first 8 nodes include
    one named ``Sub*``/``_minus*`` and one named ``Mul*``/``_mul*`` (mxnet's ``_minusscalar0``,
    ``_mulscalar0``); that rule is applied as it is. Exporters that name nodes otherwise (PyTorch writes
    ``/Sub``, ``/Mul``; the onnx helper API leaves names empty) are recognised by the operators instead:
    within the first 8 nodes, a Sub or Mul that reads the graph input, followed by the other one reading
    its output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    head = list(graph.node[:8])
    named = {
        op: next((n for n in head if n.name.startswith(prefixes)), None)
        for op, prefixes in (("Sub", ("Sub", "_minus")), ("Mul", ("Mul", "_mul")))
    }
    if named["Sub"] is not None and named["Mul"] is not None:
        return named["Sub"].name, named["Mul"].name
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    for first in head:
        if first.op_type in ("Sub", "Mul") and inputs & set(first.input):
            other = "Mul" if first.op_type == "Sub" else "Sub"
            second = next((n for n in head if n.op_type == other and set(first.output) & set(n.input)), None)
            if second is not None:
                return first.name or first.op_type, second.name or second.op_type
    return None


def onnx_input_scaling(
    path: str | os.PathLike[str],
    metadata: dict[str, str],
    mean: float | None = None,
    std: float | None = None,
) -> InputScaling:
    """The input scaling of an ONNX model: ``mean``/``std`` when given (both), else the ``normalization``
    entry of its metadata (written by ``scripts/export_onnx.py``), else a Sub/Mul head in its graph
    (:func:`folded_normalization`: raw pixels, mean 0, std 1), else insightface's default 127.5 / 127.5."""
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError(f"{path}: give both the input mean and std (--input-mean M --input-std S)")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"{path}: input mean {mean} and std {std} must be finite, the std positive")
        return InputScaling(float(mean), float(std), "given with --input-mean/--input-std")
    value = metadata.get("normalization")
    if value is not None:
        said = f"its metadata says normalization = {value!r}"
        if value.strip().lower().startswith("none"):
            return InputScaling(0.0, 1.0, said)
        if value.replace(" ", "") in {NORMALIZATION.replace(" ", ""), "(x-127.5)/127.5"}:
            return InputScaling(*DEFAULT_INPUT, said)
        raise ValueError(
            f"{path}: metadata normalization = {value!r} is neither {NORMALIZATION!r} nor 'none: ...' "
            "(raw pixels); give the input scaling with --input-mean and --input-std"
        )
    nodes = folded_normalization(path)
    if nodes is not None:
        return InputScaling(0.0, 1.0, f"its graph opens with {nodes[0]} and {nodes[1]}, a folded scaling")
    return InputScaling(*DEFAULT_INPUT, "no normalization metadata and no Sub/Mul at the head of its graph")


class OnnxEmbedder:
    """An ONNX model run by onnxruntime on ``(x - mean) / std`` of the pixels in ``color`` order.

    The colour comes from the model's ``color`` metadata when it has one (else rgb). The scaling is
    ``input_mean``/``input_std`` when given, else read from the model (:func:`onnx_input_scaling`): raw
    pixels for a model whose normalisation is folded into its graph (``scripts/export_onnx.py
    --fold-normalization``, insightface's mxnet conversions), ``(x - 127.5) / 127.5`` otherwise. One line on
    stderr says which scaling was chosen and why (``verbose=False`` keeps it quiet).

    The session runs on ``threads`` intra-op threads (default: ``core.threads.thread_count()``, the count
    PyTorch's batched work gets) and without onnxruntime's CPU memory arena: with the arena a whole LFW
    evaluation grew by about 18 MB per batch of 128 (4.4 GB at the end) and held the activations of the
    largest batch; without it the process stays at the decoded images plus one batch's activations
    (:func:`session_options`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        color: str | None = None,
        input_mean: float | None = None,
        input_std: float | None = None,
        verbose: bool = True,
        threads: int | None = None,
    ) -> None:
        import onnxruntime

        self.path, self.precision, self.cpu_batch = Path(path), "fp32", CPU_BATCH
        if self.path.stat().st_size == 0:
            raise ValueError(f"{self.path}: empty file (0 bytes), not an ONNX model")
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime's errors derive from Exception only
            reason = str(err).split(" failed:")[-1].strip() or type(err).__name__
            raise ValueError(f"{self.path}: not a readable ONNX model ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.color = color or meta.get("color", "rgb")
        self.scaling = onnx_input_scaling(self.path, meta, input_mean, input_std)
        self.normalization = self.scaling.description
        self.input = self.session.get_inputs()[0].name
        side = self.session.get_inputs()[0].shape[-1]
        self.input_size = side if isinstance(side, int) else None  # faces are resized to a fixed input
        if verbose:
            print(f"{self.path.name}: input {self.normalization} of {self.color.upper()} pixels 0..255 "
                  f"({self.scaling.reason})", file=sys.stderr)  # fmt: skip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if len(images) > self.cpu_batch:  # in slices of cpu_batch images, as TorchEmbedder on a CPU
            step = self.cpu_batch
            return torch.cat([self(images[i : i + step]) for i in range(0, len(images), step)])
        x = normalize_batch(images, self.color, self.input_size)  # (x - 127.5) / 127.5
        mean, std = self.scaling.mean, self.scaling.std
        if (mean, std) != DEFAULT_INPUT:  # the same affine map of the pixels, after any resize
            x = x.mul_(127.5 / std).add_((127.5 - mean) / std)
        out = self.session.run(None, {self.input: x.numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def session_options(threads: int | None = None, arena: bool = False):
    """onnxruntime's session options for an embedder: ``threads`` intra-op threads (default
    ``core.threads.thread_count()``), its CPU memory arena off unless ``arena`` (:class:`OnnxEmbedder`)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or thread_count("batched")
    options.enable_cpu_mem_arena = arena
    return options


def load_embedder(
    path: str | os.PathLike[str],
    backbone: str | None = None,
    color: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    input_mean: float | None = None,
    input_std: float | None = None,
    weights: str = "raw",
) -> TorchEmbedder | OnnxEmbedder:
    """An embedder for ``path``: ``.onnx`` files run with onnxruntime; a checkpoint of this framework
    carries its architecture and colour; any other state dict needs ``backbone``: insightface's ``model.pt``
    (colour default rgb) or AdaFace's Lightning ``.ckpt`` (converted by ``backbones.converters``, colour
    default bgr). ``precision`` (fp32 | bf16 | fp16) is the autocast of a
    PyTorch model (see :class:`TorchEmbedder`); ONNX models run as exported. ``input_mean``/``input_std``
    override the input scaling an ONNX model is fed (see :class:`OnnxEmbedder`). ``weights`` picks a
    checkpoint's trained weights (``raw``, the default) or their average (``ema``, kept with train.ema)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a model file")
    check_precision(precision)
    if weights not in WEIGHTS:
        raise ValueError(f"{path}: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if path.suffix == ".onnx":
        if weights != "raw":
            raise ValueError(
                f"{path}: the weight average (--use-ema) is for checkpoints of this framework, not ONNX"
            )
        if precision != "fp32":
            raise ValueError(f"{path}: precision {precision} is for PyTorch models; ONNX runs as exported")
        return OnnxEmbedder(path, color, input_mean, input_std)
    if input_mean is not None or input_std is not None:
        raise ValueError(
            f"{path}: --input-mean/--input-std are for ONNX models; PyTorch models get {NORMALIZATION}"
        )
    state = load_weights(path)  # the one loader of PyTorch files: one-line errors naming the file
    if isinstance(state, dict) and "format_version" in state:
        model, meta = checkpoint_backbone(path, state, weights)
        embedder = TorchEmbedder(model, color or meta["color"], device, precision=precision)
        embedder.weights = weights
        return embedder
    if weights != "raw":
        raise ValueError(f"{path}: the weight average (--use-ema) is for checkpoints trained with train.ema")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning .ckpt (AdaFace)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: neither a checkpoint of this framework nor a backbone state dict")
    if backbone is None:
        raise ValueError(f"{path}: a plain state dict; name its architecture (--backbone r50, ...)")
    adaface = any(k.removeprefix("model.").startswith(("input_layer.", "body.")) for k in state)
    try:  # insightface model.pt: our layout (a DDP prefix dropped); AdaFace: its IR names, BGR input
        state = from_adaface(state, backbone) if adaface else from_insightface(state)
    except (ConversionError, UnknownNameError) as err:
        raise ValueError(f"{path}: {err}") from None
    model = _backbone(path, backbone, embedding_size=_embedding_size(path, backbone, state))
    _load_backbone_weights(path, model, state, f"backbone {backbone!r}")
    return TorchEmbedder(model, color or ("bgr" if adaface else "rgb"), device, precision=precision)


def checkpoint_backbone(
    path: str | os.PathLike[str], state: dict, weights: str = "raw"
) -> tuple[nn.Module, dict]:
    """(backbone, meta) of a checkpoint of this framework read from ``path``: the architecture, embedding
    and input size of its meta, with its trained weights (``weights`` raw) or their average (``ema``, the
    checkpoint's ``ema`` entry); anything missing or not fitting is one line naming the file."""
    path = Path(path)
    state = checked_checkpoint(path, state)
    meta = state.get("meta")
    needed = ("arch", "embedding_size", "input_size", "color")
    if not isinstance(meta, dict) or any(k not in meta for k in needed) or "backbone" not in state:
        raise ValueError(f"{path}: a checkpoint without backbone weights and meta {', '.join(needed)}")
    import_checkpoint_imports(state.get("config"), path)  # the run's custom_imports: a user's backbone
    model = _backbone(
        path, meta["arch"], embedding_size=meta["embedding_size"], input_size=meta["input_size"]
    )
    if weights == "ema":
        average = state.get("ema")
        if not isinstance(average, dict) or not isinstance(average.get("backbone"), dict):
            raise ValueError(
                f"{path}: holds no average of the weights (trained without train.ema); leave out --use-ema"
            )
        _load_backbone_weights(path, model, average["backbone"], f"its meta arch {meta['arch']!r} (ema)")
        return model, meta
    _load_backbone_weights(path, model, state["backbone"], f"its meta arch {meta['arch']!r}")
    return model, meta


def _backbone(path: Path, arch: str, **kwargs: object) -> nn.Module:
    try:
        return build_backbone(arch, **kwargs)
    except UnknownNameError as err:
        raise ValueError(f"{path}: {err}") from None


def _embedding_size(path: Path, arch: str, state: dict) -> int:
    """The embedding size of backbone state dict ``state`` for architecture ``arch``: the length of the
    tensor where ``arch`` keeps it, its last 1-D tensor (the BN after the embedding layer in IResNet,
    MobileFaceNet and ViT), found by building ``arch`` without memory (the meta device, or the CPU for an
    architecture whose construction computes on its tensors). The default size when ``state`` lacks that
    tensor; loading then names what does not fit."""
    try:
        with torch.device("meta"):
            probe = _backbone(path, arch)
    except (NotImplementedError, RuntimeError):
        probe = _backbone(path, arch)
    last = [k for k, v in probe.state_dict().items() if v.ndim == 1][-1]
    found = state.get(last)
    return int(found.shape[0]) if torch.is_tensor(found) and found.ndim == 1 else int(probe.embedding_size)


def _load_backbone_weights(path: Path, model: nn.Module, state: dict, what: str) -> None:
    """``state`` into ``model``, or one line naming the file and the first keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(missing)} weights missing (first {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} unexpected (first {unexpected[0]})"] if unexpected else []
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (first {k}: {tuple(state[k].shape)}, "
                        f"expected {tuple(own[k].shape)})")  # fmt: skip
    if problems:
        raise ValueError(f"{path}: does not fit {what}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def embedder_key(path: str | os.PathLike[str], embedder: TorchEmbedder | OnnxEmbedder) -> str:
    """A name for cached features: the model file (name, size, mtime), its colour, its precision, the
    checkpoint's average when it is the one evaluated (``_ema``) and, when it is not the default
    ``(x - 127.5) / 127.5``, its input scaling."""
    stat = Path(path).stat()
    key = f"{Path(path).stem}_{stat.st_size}_{int(stat.st_mtime)}_{embedder.color}"
    key = key if embedder.precision == "fp32" else f"{key}_{embedder.precision}"
    key = key if getattr(embedder, "weights", "raw") == "raw" else f"{key}_{embedder.weights}"
    scaling = getattr(embedder, "scaling", None)
    if scaling is not None and (scaling.mean, scaling.std) != DEFAULT_INPUT:
        key += f"_in{scaling.mean:g}-{scaling.std:g}"
    return key
