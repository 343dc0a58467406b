"""BatchNorm folded into the convolution before it: the fast CPU path of the TorchEmbedder.

In eval mode a BatchNorm after a convolution is an affine map per output channel, so it can be folded into
that convolution's weights and bias: ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta`` (``torch.nn.utils.fusion.fuse_conv_bn_weights``). The folded
network skips one pass over every such activation; on CPUs, where those passes are memory-bound, that is
what separates PyTorch from onnxruntime (which folds them when it loads a model): MobileFaceNet's 49
BatchNorms all fold (docs/evaluation.md, "Speed and memory on CPUs", has the measurements).

Which BatchNorm may be folded is read from one probe forward pass, so no backbone has to declare it and
no graph tracer has to understand its ``forward``: hooks record the output of every ``Conv2d`` and the
input of every ``BatchNorm2d``, and a ``TorchFunctionMode`` counts the operations that read each
convolution output. A BatchNorm is folded when its input is a convolution's output that nothing else
reads (a convolution feeding both a BatchNorm and a residual sum keeps its BatchNorm), and when both
ran once in the pass (a module called twice would be folded for one of its calls only). The folded copy
is then checked against the model on the probe images; the model itself is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode

# Folded features equal the model's within float32 rounding (measured: 1e-5 of the largest |feature| for
# mbf and r50); a wrong fold changes them by far more.
TOLERANCE = 1e-3


class _Readers(TorchFunctionMode):
    """Counts, per watched tensor, the operations that read it (metadata queries such as ``dim()`` or
    ``shape``, which return no tensor, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[int, int] = {}

    def watch(self, tensor: torch.Tensor) -> None:
        self.reads[id(tensor)] = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)
        ):
            for arg in (*args, *kwargs.values()):
                for tensor in arg if isinstance(arg, (tuple, list)) else (arg,):
                    if isinstance(tensor, torch.Tensor) and id(tensor) in self.reads:
                        self.reads[id(tensor)] += 1
        return out


def foldable_pairs(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` of every ``BatchNorm2d`` of ``model`` (in eval mode) that may be folded
    into the ``Conv2d`` before it, read from one forward pass over ``sample`` (see the module notes)."""
    conv_of: dict[int, str] = {}  # id of a conv output -> the conv's name
    conv_calls: dict[str, int] = {}
    bn_inputs: dict[str, list[int]] = {}
    kept: list[torch.Tensor] = []  # ids stay unique while the tensors live
    readers = _Readers()

    def conv_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            kept.append(output)
            conv_of[id(output)] = name
            conv_calls[name] = conv_calls.get(name, 0) + 1
            readers.watch(output)

        return hook

    def bn_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            kept.append(inputs[0])
            bn_inputs.setdefault(name, []).append(id(inputs[0]))

        return hook

    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) is nn.BatchNorm2d:
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad(), readers:
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn, inputs in bn_inputs.items():
        if len(inputs) == 1 and inputs[0] in conv_of and readers.reads.get(inputs[0]) == 1:
            pairs.append((conv_of[inputs[0]], bn))
    return [(conv, bn) for conv, bn in pairs if conv_calls[conv] == 1]


def fold_batchnorm(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, int]:
    """(a copy of ``model`` in eval mode with its foldable BatchNorms folded into their convolutions and
    replaced by ``nn.Identity``, the number folded). ``model`` is left as it is."""
    folded = copy.deepcopy(model).eval()
    pairs = foldable_pairs(folded, sample)
    modules = dict(folded.named_modules())
    count = 0
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            if bn.running_mean is None or bn.running_var is None:
                continue  # BatchNorm without running statistics normalises by the batch: not foldable
            count += 1
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            conv.weight, conv.bias = weight, bias
            parent, _, attr = bn_name.rpartition(".")
            setattr(modules[parent] if parent else folded, attr, nn.Identity())
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded, count


def parameter_versions(model: nn.Module) -> tuple[int, ...]:
    """The in-place version counters of ``model``'s parameters and buffers: they change whenever the weights
    are changed in place (an optimiser step, ``load_state_dict``), so a folded copy knows it is stale."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def largest_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected| (inf when the shapes differ or a value is not finite)."""
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-12)
    return float((got - expected).abs().max() / scale)
