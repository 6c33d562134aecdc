"""A residual MLP noise predictor ``model(x, t, y=None) -> eps`` for vector data (2-D toys, tabular).

``h = W_in x``; then ``depth`` pre-norm residual blocks
``h <- h + W_2 SiLU(W_1 SiLU(LayerNorm(h)) + U emb(t, y))``; then ``eps = W_out SiLU(LayerNorm(h))``
with ``W_out`` zero-initialised (the untrained model predicts eps = 0). ``emb`` is the same time
(and optional class) embedding the U-Net uses (:class:`.embeddings.ConditioningEmbedding`).
Inputs of any per-sample shape whose size is ``dim`` are flattened and the output reshaped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import EMBEDDINGS, ConditioningEmbedding


class _Block(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.emb, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb(F.silu(emb))
        return h + self.fc2(self.drop(F.silu(z)))


class MLP(nn.Module):
    """Residual MLP eps-predictor: ``forward(x (B, dim), t (B,), y (B,) | None) -> (B, dim)``.

    Args:
        dim: data dimension (per-sample number of entries).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        num_classes: classes for conditioning (``num_classes`` is the null label), or None.
        embedding: ``"sinusoidal"`` or ``"fourier"`` time features.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        num_classes: int | None = None,
        embedding: str = "sinusoidal",
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in [("dim", dim), ("hidden", hidden), ("depth", depth)]:
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}; got {embedding!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout!r}")
        self.config = {
            "arch": "mlp",
            "dim": int(dim),
            "hidden": int(hidden),
            "depth": int(depth),
            "num_classes": None if num_classes is None else int(num_classes),
            "embedding": embedding,
            "dropout": float(dropout),
        }
        self.dim, self.num_classes = int(dim), num_classes
        self.cond = ConditioningEmbedding(hidden, embedding, num_classes, feat_dim=max(16, (hidden // 4) * 2))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([_Block(hidden, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}) (or (B, ...) with {self.dim} entries); got {tuple(x.shape)}")
        emb = self.cond(t, y, x.shape[0])  # (B, hidden)
        h = self.inp(x.reshape(x.shape[0], self.dim))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h))).reshape(x.shape)
