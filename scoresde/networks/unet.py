"""A DDPM++-style U-Net noise predictor ``model(x, t, y=None) -> eps`` for images ``(B, C, H, W)``.

Architecture (Ho et al. 2020, "DDPM"; Song et al. 2021, DDPM++ in "Score-Based Generative Modeling
through SDEs"; Dhariwal & Nichol 2021 for multi-head attention):

- a 3x3 input conv to ``base_channels``;
- per resolution level ``i`` with multiplier ``channel_mult[i]``: ``num_res_blocks`` residual blocks
  (GroupNorm, SiLU, 3x3 conv, + projected time/class embedding, GroupNorm, SiLU, dropout, 3x3 conv;
  output ``(skip(x) + h) / sqrt(2)`` as DDPM++'s ``skip_rescale``), self-attention after each block
  at the resolutions listed in ``attn_resolutions``, then a stride-2 conv halving the resolution
  (all but the last level);
- a middle of residual block, attention, residual block at the lowest resolution;
- the mirror path with ``num_res_blocks + 1`` blocks per level, each taking the matching skip
  activation concatenated on channels, and nearest-neighbour x2 upsampling followed by a 3x3 conv;
- GroupNorm, SiLU and a zero-initialised 3x3 conv back to ``in_channels`` (so the untrained model
  predicts eps = 0, and every residual branch starts as the identity: the second conv of each block
  and each attention output projection are zero-initialised too).

The network sees continuous time ``t`` only (sinusoidal features of ``1000 t`` or Gaussian Fourier
features of ``t``; see :mod:`.embeddings`), never the SDE. With ``num_classes`` it is class
conditional, and label ``num_classes`` (or ``y=None``) is the null label of classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._tensor import append_dims
from .embeddings import EMBEDDINGS, ConditioningEmbedding

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with about 4 channels per group, at most 32 groups (32 groups of 4 for 128 channels)."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``(skip(x) + conv2(drop(act(norm2(conv1(act(norm1(x))) + W act(emb)))))) / sqrt(2)``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.drop = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + append_dims(self.emb(F.silu(emb)), h.ndim)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * _SQRT_HALF


class AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, residual: ``(x + proj(attn(norm(x)))) / sqrt(2)``."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            self.heads = 1
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * _SQRT_HALF


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One residual block, optionally followed by attention; ``takes_skip`` on the up path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool, takes_skip: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = AttnBlock(out_ch) if attn else None
        self.takes_skip = takes_skip

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


def unet_resolutions(image_size: int, channel_mult: Sequence[int]) -> list[int]:
    """Resolution of each level: ``image_size / 2^i``; ValueError if it cannot be halved that often."""
    levels = len(channel_mult)
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} cannot be halved {levels - 1} times (channel_mult has {levels} levels): "
            f"it must be a multiple of {factor}; use fewer levels or pad/resize the images"
        )
    return [image_size // 2**i for i in range(levels)]


class UNet(nn.Module):
    """DDPM++-style U-Net predicting eps: ``forward(x (B, C, H, W), t (B,), y (B,) | None) -> (B, C, H, W)``.

    Args:
        in_channels: image channels C (the output has the same).
        image_size: side H = W of the square images it is built for; must be a multiple of
            ``2^(len(channel_mult) - 1)``. Other sizes with that divisibility also run (convolutional).
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: per-level channel multipliers (one level per entry).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (side lengths, e.g. ``(16,)``) with self-attention after each
            residual block; each must be a resolution some level has.
        dropout: dropout rate inside the residual blocks.
        num_classes: number of classes for conditioning (labels ``0..num_classes-1``; ``num_classes``
            is the null label), or None for an unconditional model.
        embedding: ``"sinusoidal"`` (of ``1000 t``) or ``"fourier"`` (Gaussian Fourier features of ``t``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_classes: int | None = None,
        embedding: str = "sinusoidal",
    ):
        super().__init__()
        for name, value in [("in_channels", in_channels), ("image_size", image_size),
                            ("base_channels", base_channels), ("num_res_blocks", num_res_blocks)]:
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers; got {channel_mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}; got {embedding!r}")
        resolutions = unet_resolutions(int(image_size), channel_mult)
        attn_resolutions = tuple(sorted({int(r) for r in attn_resolutions}, reverse=True))
        unknown = [r for r in attn_resolutions if r not in resolutions]
        if unknown:
            raise ValueError(
                f"attn_resolutions {list(unknown)} are not resolutions of this U-Net; "
                f"image_size {image_size} with channel_mult {list(channel_mult)} has levels {resolutions}"
            )
        self.config = {
            "arch": "unet",
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "base_channels": int(base_channels),
            "channel_mult": list(channel_mult),
            "num_res_blocks": int(num_res_blocks),
            "attn_resolutions": list(attn_resolutions),
            "dropout": float(dropout),
            "num_classes": None if num_classes is None else int(num_classes),
            "embedding": embedding,
        }
        self.in_channels, self.num_classes = int(in_channels), num_classes
        self._down_factor = 2 ** (len(channel_mult) - 1)
        ch = int(base_channels)
        emb_dim = 4 * ch
        self.cond = ConditioningEmbedding(emb_dim, embedding, num_classes, feat_dim=ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # -- down path: remember the channels of every activation kept for a skip connection
        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(channel_mult):
            res, out = resolutions[level], ch * mult
            for _ in range(num_res_blocks):
                self.down.append(Level(cur, out, emb_dim, dropout, res in attn_resolutions, takes_skip=False))
                cur = out
                skips.append(cur)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout), AttnBlock(cur), ResBlock(cur, cur, emb_dim, dropout)])

        # -- up path: each block consumes one skip, in reverse order
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            res, out = resolutions[level], ch * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(Level(cur + skips.pop(), out, emb_dim, dropout, res in attn_resolutions, takes_skip=True))
                cur = out
            if level > 0:
                self.up.append(Upsample(cur))
        assert not skips

        self.norm_out = group_norm(cur)
        self.conv_out = _zero(nn.Conv2d(cur, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        if x.shape[-1] % self._down_factor or x.shape[-2] % self._down_factor:
            raise ValueError(f"image sides must be multiples of {self._down_factor} for this U-Net; got {tuple(x.shape[-2:])}")
        emb = self.cond(t, y, x.shape[0])  # (B, 4 ch)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for block in self.up:
            if getattr(block, "takes_skip", False):
                h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
