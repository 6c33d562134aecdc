"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

A model trained with labels randomly replaced by the null label learns both ``eps(x, t, y)`` and
``eps(x, t, null)``. Guidance combines them,

    eps_w(x, t, y) = eps_u + w (eps_c - eps_u),     eps_c = eps(x, t, y),  eps_u = eps(x, t, null),

so ``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one, and ``w > 1``
sharpens samples towards the class. (Ho & Salimans write ``(1 + w') eps_c - w' eps_u``: ``w = 1 + w'``.)
The wrapper makes one batched call on ``[x; x]`` with labels ``[y; null]``, and obeys the model
contract ``model(x, t, y) -> eps``, so every sampler takes it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierFreeGuidance(nn.Module):
    """``forward(x, t, y) = eps_u + scale (eps_c - eps_u)`` from one batched call of ``model``.

    Args:
        model: a class-conditional ``model(x, t, y) -> eps`` that accepts ``null_label``.
        scale: guidance weight ``w`` (1: conditional, 0: unconditional); a per-call ``scale=``
            keyword overrides it (e.g. through a sampler's ``model_kwargs``).
        null_label: the label meaning "no class" (``num_classes`` for our networks; taken from
            ``model.num_classes`` when None).
    """

    def __init__(self, model: nn.Module, scale: float, null_label: int | None = None):
        super().__init__()
        if null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError("null_label must be given: the model has no num_classes attribute (is it conditional?)")
        self.model, self.scale, self.null_label = model, float(scale), int(null_label)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *, scale: float | None = None, **kwargs) -> torch.Tensor:
        w = self.scale if scale is None else float(scale)
        b = x.shape[0]
        if y is None:  # nothing to guide towards: the unconditional model
            y = torch.full((b,), self.null_label, dtype=torch.long, device=x.device)
            return self.model(x, t, y, **kwargs)
        y = torch.as_tensor(y, device=x.device)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        null = torch.full_like(y, self.null_label)
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **kwargs)  # (2B, ...)
        eps_c, eps_u = eps[:b], eps[b:]
        return eps_u + w * (eps_c - eps_u)
