"""Vision Transformers of insightface arcface_torch (its ``backbones/vit.py`` ``VisionTransformer``).

Pre-norm transformer on 9 x 9 patches (112 x 112 -> 12 x 12 = 144 tokens, the last 4 pixel rows and
columns unused, as there), learned position embeddings, no class token; blocks of LayerNorm -> attention
(no qkv bias) and LayerNorm -> MLP (4x, ReLU6), each branch with stochastic depth (rates rising linearly
from 0 over the blocks). The embedding ("feature") head flattens all tokens after the final LayerNorm:
Linear(144 D -> D, no bias) -> BN1d -> Linear(D -> E, no bias) -> BN1d (eps 2e-5). In training a
``mask_ratio`` of the patches of every image is dropped after the position embedding (per-sample random
choice); the blocks see only the kept tokens, and a learned ``mask_token`` takes the dropped places after
the final norm, before the head.

State-dict keys and shapes are arcface_torch's for every size its ``get_model`` builds, so its released ViT
``model.pt`` files load with ``strict=True`` (tested against a recorded layout, and eval- and train-mode
embeddings recorded from its code). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPUs; the same
softmax(q k^T / sqrt(d)) v); no timm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backbones import BACKBONES
from backbones.common import body_autocast, check_precision, fp32_head, run_block

PATCH_SIZE = 9  # arcface_torch's get_model: every ViT on 9 x 9 patches of the 112 x 112 crop
FEATURE_BN_EPS = 2e-5


@dataclass(frozen=True)
class ViTSize:
    """Width, depth, heads, the last block's stochastic-depth rate and the patch-drop ratio of one size."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float


# arcface_torch recognition/arcface_torch/backbones/__init__.py get_model (the *_dp005_* names are the
# WebFace42M settings its configs name); vit_l is its only large setting, vit_l_dp005_mask_005. The mask ratio
# is the fraction its training actually drops: get_model passes 0.05 to the two *_mask_005 settings, but its
# forward_features calls random_masking without it, whose default 0.1 applies to every ratio above 0 (vit.py
# L224, L260), so those settings train on 129 of 144 tokens there and here.
SIZES = {
    "vit_t": ViTSize(256, 12, 8, 0.1, 0.1),
    "vit_t_dp005_mask0": ViTSize(256, 12, 8, 0.05, 0.0),
    "vit_s": ViTSize(512, 12, 8, 0.1, 0.1),
    "vit_s_dp005_mask_0": ViTSize(512, 12, 8, 0.05, 0.0),
    "vit_b": ViTSize(512, 24, 8, 0.1, 0.1),
    "vit_b_dp005_mask_005": ViTSize(512, 24, 8, 0.05, 0.1),
    "vit_l": ViTSize(768, 24, 8, 0.05, 0.1),
    "vit_h": ViTSize(1024, 48, 8, 0.1, 0.0),
    # Not arcface_torch's: a size that trains on a CPU in the tests and the docs' tiny runs.
    "vit_xs": ViTSize(96, 4, 4, 0.0, 0.1),
}
ALIASES = {"vit_l": ("vit_l_dp005_mask_005",)}


class DropPath(nn.Module):
    """Stochastic depth: in training each sample's residual branch is dropped with probability ``rate``
    and kept ones are scaled by 1 / (1 - rate); one Bernoulli draw per sample."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        draw = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * draw.div_(keep)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` convolution: (N, 3, S, S) -> (N, (S // patch)^2, D)."""

    def __init__(self, input_size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (scale 1 / sqrt(head dim))."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, tokens, head dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, tokens, dim)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """x + DropPath(Attention(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        # Registration order is the state-dict order of the reference: norm1, norm2, attn, mlp.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """arcface_torch's ViT; returns the un-normalised embedding (N, E).

    Args:
        embed_dim, depth, num_heads: width D, blocks, attention heads.
        drop_path_rate: stochastic-depth rate of the last block (block i: rate * i / (depth - 1)).
        mask_ratio: fraction of the patches dropped per image in training (0: none); the blocks run on
            ``int(L * (1 - mask_ratio))`` tokens.
        embedding_size: E.
        dropout: dropout on the flattened tokens before the embedding head (arcface_torch has none: 0).
        precision: ``fp32``, or ``fp16``/``bf16`` to run the transformer blocks under autocast (attention
            too, so a GPU takes its fused kernels); the patch embedding, final norm and the head run in
            fp32 and the output is fp32.
        grad_checkpoint: recompute each block in the backward pass instead of keeping its activations.
        input_size: side of the square input (112: 12 x 12 patches of 9 x 9).
        patch_size: side of a patch (9 in every arcface_torch size).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
        patch_size: int = PATCH_SIZE,
    ) -> None:
        super().__init__()
        check_precision(precision)
        if input_size < patch_size:
            raise ValueError(f"input_size must be at least the patch size {patch_size}, got {input_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.precision = precision
        self.grad_checkpoint = grad_checkpoint
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.num_patches = (input_size // patch_size) ** 2
        self.conv_final_dim = self.num_patches * embed_dim  # what ProbFace's uncertainty module reads

        # Registration order gives the reference's state-dict order (pos_embed, mask_token, patch_embed, ...).
        self.patch_embed = PatchEmbed(input_size, patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        # float32 rates as the reference computes them (torch.linspace), on the CPU under any default device
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(self.conv_final_dim, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=FEATURE_BN_EPS),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's: truncated N(0, 0.02) linear weights and position embedding, zero biases, unit
        # LayerNorms, N(0, 0.02) mask token; the patch convolution and the BNs keep PyTorch's defaults.
        if self.pos_embed.is_meta:  # shapes only (the meta device): nothing to draw, and its normal_
            return  # would import torch._dynamo
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # --- layer-wise learning-rate decay (core.optim) ---

    @property
    def lr_depth(self) -> int:
        """Layers for ``optim.layer_decay``: 0 the patch and position embeddings and the mask token, i + 1 the
        block i, ``depth + 1`` the final norm and the embedding head."""
        return self.depth + 1

    def lr_layer(self, name: str) -> int:
        """The layer (0 .. :attr:`lr_depth`) of the parameter ``name`` of :meth:`named_parameters`."""
        if name.startswith(("patch_embed.", "pos_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.lr_depth

    # --- forward ---

    def _drop_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each image's tokens; returns them and the permutation that
        puts the kept tokens, followed by the dropped places, back in patch order."""
        n, length, dim = x.shape
        keep = int(length * (1.0 - self.mask_ratio))
        order = torch.argsort(torch.rand(n, length, device=x.device), dim=1)  # random per image
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, dim))
        return kept, restore

    def _fill_dropped(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        n, kept, dim = x.shape
        filler = self.mask_token.to(x.dtype).expand(n, restore.shape[1] - kept, dim)
        return torch.gather(torch.cat([x, filler], dim=1), 1, restore[..., None].expand(-1, -1, dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens after the final norm, (N, num_patches, D) in fp32, with the mask token in the places
        of the patches dropped in training."""
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"input of {tuple(x.shape[-2:])} pixels; this ViT was built for "
                f"{self.input_size}x{self.input_size} (input_size)"
            )
        with fp32_head(x):
            x = self.patch_embed(x.float()) + self.pos_embed
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = self._drop_patches(x)
        with body_autocast(x, self.precision):
            for block in self.blocks:
                x = run_block(block, x, self.grad_checkpoint)
        with fp32_head(x):
            x = self.norm(x.float())
            return x if restore is None else self._fill_dropped(x, restore)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The embedding; with ``return_features`` also the flattened tokens the head reads (``conv_final``,
        (N, :attr:`conv_final_dim`), fp32, before dropout) from the same pass, for ProbFace."""
        tokens = torch.flatten(self.forward_features(x), 1)
        with fp32_head(tokens):
            embedding = self.feature(self.dropout(tokens))
        return (embedding, tokens) if return_features else embedding


def _make(name: str):
    size = SIZES[name]

    def factory(
        embedding_size: int = 512,
        dropout: float = 0.0,
        precision: str = "fp32",
        grad_checkpoint: bool = False,
        input_size: int = 112,
    ) -> VisionTransformer:
        return VisionTransformer(
            size.embed_dim, size.depth, size.num_heads, size.drop_path_rate, size.mask_ratio,
            embedding_size=embedding_size, dropout=dropout, precision=precision,
            grad_checkpoint=grad_checkpoint, input_size=input_size,
        )  # fmt: skip

    factory.__name__ = name
    factory.__doc__ = (
        f"ViT width {size.embed_dim}, {size.depth} blocks, {size.num_heads} heads, stochastic depth up to "
        f"{size.drop_path_rate}, mask ratio {size.mask_ratio}; see :class:`VisionTransformer`."
    )
    return BACKBONES.register(name, *ALIASES.get(name, ()))(factory)


vit_t = _make("vit_t")
vit_t_dp005_mask0 = _make("vit_t_dp005_mask0")
vit_s = _make("vit_s")
vit_s_dp005_mask_0 = _make("vit_s_dp005_mask_0")
vit_b = _make("vit_b")
vit_b_dp005_mask_005 = _make("vit_b_dp005_mask_005")
vit_l = _make("vit_l")
vit_h = _make("vit_h")
vit_xs = _make("vit_xs")
