"""Parameters and forward cost of the backbones, the figures of the README's backbone table.

    python -m scripts.bench_backbones                          # every backbone (aliases once), 112 x 112
    python -m scripts.bench_backbones --backbones vit_t vit_s r100 --markdown

For each backbone: its parameters (buffers not counted; the 512-d embedding head included) and the cost of
one forward pass of one image in eval mode, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
CPU. GMACs are multiply-accumulates, the unit the field's tables call "GFLOPs" (arcface_torch's README:
r100 12.1, ViT-T 1.5, ViT-B 11.4, ViT-L 25.3); GFLOPs here are 2 x GMACs, what ``FlopCounterMode`` and
``scripts/bench_train.py`` report. Convolutions, matrix products and attention (q k^T and the product
with v) are counted; normalisations, activations and additions are not. On the CPU,
``scaled_dot_product_attention`` runs a kernel that ``FlopCounterMode`` has no formula for, so the formula
of the GPU kernels is registered for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from backbones import BACKBONES, build_backbone, list_backbones


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# CPU attention kernels -> the FLOP formula FlopCounterMode uses for the CUDA ones (2 x q k^T + 2 x attn v)
ATTENTION_OPS = {
    getattr(torch.ops.aten, name): _attention_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, name)
}


def distinct_backbones() -> list[str]:
    """Every registered backbone name, an alias (the same factory under another name) only once."""
    seen: dict[object, str] = {}
    for name in list_backbones():
        seen.setdefault(BACKBONES.get(name), name)
    return sorted(seen.values())


def forward_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one eval-mode forward pass of a ``size`` x ``size`` image."""
    x = torch.zeros(1, 3, size, size)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_OPS) as counter:
        model(x)
    return counter.get_total_flops() // 2


def measure(name: str, size: int = 112, embedding_size: int = 512) -> dict[str, object]:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=embedding_size, input_size=size)
    macs = forward_macs(model, size)
    return {
        "name": name,
        "input": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": macs / 1e9,
        "gflops": 2 * macs / 1e9,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=None, metavar="NAME", help="default: every backbone")
    p.add_argument("--input-size", type=int, default=112, help="input side (resface64 is measured at 96)")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--markdown", action="store_true", help="a Markdown table instead of aligned columns")
    return p


# Backbones whose input side is fixed by their design, measured at it whatever --input-size says.
NATIVE_INPUT = {"resface64": 96}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.backbones or distinct_backbones()
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        print(f"bench_backbones: unknown backbone {unknown[0]!r}; known: {', '.join(list_backbones())}")
        return 2
    torch.set_grad_enabled(False)
    rows = []
    for name in names:
        size = NATIVE_INPUT.get(name, args.input_size)
        rows.append(measure(name, size, args.embedding_size))
        row = rows[-1]
        if not args.markdown:
            print(
                f"{name:<26} input {size:>3}  params {row['params_m']:8.2f} M  "
                f"GMACs {row['gmacs']:7.3f}  GFLOPs {row['gflops']:7.3f}",
                flush=True,
            )
    if args.markdown:
        print('| backbone | input | params (M) | GMACs ("GFLOPs" of the field) | GFLOPs (2 x MACs) |')
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| `{row['name']}` | {row['input']} | {row['params_m']:.2f} | {row['gmacs']:.2f} | "
                f"{row['gflops']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
