"""Embeddings of continuous time ``t`` and of class labels for the score networks.

The networks see only ``t`` in ``[0, T]`` (shape ``(B,)``), never the SDE, so the same trained net
runs under any sampler. Two standard featurisations of the scalar ``t``:

- sinusoidal (Vaswani et al. 2017, as in DDPM, Ho et al. 2020): with ``s = scale * t`` (``scale``
  1000 maps ``t in [0, 1]`` onto DDPM's integer timesteps) and ``f_k = max_period^(-k / half)``,
  ``emb = [cos(s f_k), sin(s f_k)]_{k < half}``.
- Gaussian Fourier features (Tancik et al. 2020; NCSN++, Song et al. 2021):
  ``emb = [sin(2 pi W t), cos(2 pi W t)]`` with fixed ``W_k ~ N(0, scale^2)``, drawn from a seeded
  generator so a model is the same whatever the global RNG state (and saved in the state dict).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._tensor import checks_enabled

#: names accepted by :func:`time_embedding`
EMBEDDINGS = ("sinusoidal", "fourier")


def _feature_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 times: ``sin(1000 t)`` needs more than half precision
    whatever the dtype of the network's weights (features are cast to it afterwards)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class SinusoidalEmbedding(nn.Module):
    """DDPM-style sinusoidal features of ``scale * t``: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be an even integer >= 2; got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # (half,)
        self.dim, self.scale = dim, float(scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dt = _feature_dtype(t)
        args = (self.scale * t.to(self.freqs.device, dt))[:, None] * self.freqs.to(dt)[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2 pi W t), cos(2 pi W t)]``, ``W ~ N(0, scale^2)`` fixed: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"embedding dim must be an even integer >= 2; got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(dim // 2, generator=g) * scale)  # (half,), saved, not trained
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dt = _feature_dtype(t)
        args = 2 * math.pi * t.to(self.W.device, dt)[:, None] * self.W.to(dt)[None]  # (B, half)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


def time_embedding(kind: str, dim: int) -> nn.Module:
    """Build the featurisation named ``kind`` (one of :data:`EMBEDDINGS`)."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return GaussianFourierEmbedding(dim)
    raise ValueError(f"embedding must be one of {EMBEDDINGS}; got {kind!r}")


class ConditioningEmbedding(nn.Module):
    """Time (and optional class) conditioning vector ``(B, out_dim)`` shared by every block.

    ``emb(t) = MLP(features(t))`` with MLP = Linear, SiLU, Linear (DDPM). With ``num_classes``, a
    learned label embedding is added; label ``num_classes`` is the *null label* (no class), used
    when ``y`` is None and for classifier-free guidance (Ho & Salimans 2022).
    """

    def __init__(self, out_dim: int, kind: str = "sinusoidal", num_classes: int | None = None, feat_dim: int | None = None):
        super().__init__()
        feat_dim = feat_dim or max(2, (out_dim // 4) * 2)
        self.features = time_embedding(kind, feat_dim)
        self.mlp = nn.Sequential(nn.Linear(feat_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.num_classes = num_classes
        if num_classes is not None:
            if int(num_classes) < 1:
                raise ValueError(f"num_classes must be a positive integer or None; got {num_classes}")
            self.label = nn.Embedding(int(num_classes) + 1, out_dim)  # last row: null label

    def forward(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        t = as_batch_time(t, batch)
        first = self.mlp[0].weight
        emb = self.mlp(self.features(t).to(first.dtype))
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y was given but the model was built with num_classes=None (unconditional)")
            return emb
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
        y = torch.as_tensor(y, device=emb.device)
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"y must be an integer tensor of shape ({batch},); got {tuple(y.shape)} {y.dtype}")
        if checks_enabled() and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(
                f"y must hold labels in [0, {self.num_classes - 1}] or the null label {self.num_classes}; "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        return emb + self.label(y.long())


def as_batch_time(t: torch.Tensor | float, batch: int) -> torch.Tensor:
    """Accept ``t`` of shape ``(B,)`` (the contract), or a scalar broadcast to the batch."""
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one time per sample); got {tuple(t.shape)}")
    return t
