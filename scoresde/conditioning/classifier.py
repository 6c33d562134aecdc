"""Classifier guidance (Song et al. 2021, sec. 5; Dhariwal & Nichol 2021) with a noise-conditional classifier.

A classifier ``p_t(c | x_t)`` trained on noised data gives the conditional score by Bayes' rule,
``grad log p_t(x | c) = grad log p_t(x) + grad log p_t(c | x)``, so in eps form

    eps_c(x, t) = eps(x, t) - scale * std(t) * grad_x log p_t(c | x),

``scale = 1`` being exact when both the model and the classifier are. For a Gaussian mixture the
exact noisy classifier of the component label is the responsibility ``p_t(k | x)``
(:class:`MixtureClassifier`), and guidance with it at scale 1 gives exactly component ``k``'s eps.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._tensor import append_dims, unchecked
from ..sde import SDE

Tensor = torch.Tensor


class NoisyClassifier(nn.Module):
    """A small noise-conditional classifier ``logits = f(x_t, t)`` for data of any shape.

    The flattened input is concatenated with Fourier features of ``log std(t)/alpha(t)`` (the
    log noise-to-signal ratio, so the same net suits every SDE) and fed to an MLP with SiLU.

    Args:
        in_shape: the data's event shape.
        num_classes: number of labels.
        hidden: width of the hidden layers; depth: their number.
        sde: the SDE defining the noise level fed to the net (stored in its config).
    """

    def __init__(self, in_shape, num_classes: int, sde: SDE, hidden: int = 256, depth: int = 3, features: int = 16):
        super().__init__()
        self.in_shape, self.num_classes, self.sde = tuple(int(s) for s in in_shape), int(num_classes), sde
        self.hidden, self.depth, self.features = int(hidden), int(depth), int(features)
        d = int(math.prod(self.in_shape))
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.1), math.log(10.0), self.features)))
        layers = []
        width = d + 2 * self.features
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.SiLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def config(self) -> Dict[str, Any]:
        return dict(in_shape=list(self.in_shape), num_classes=self.num_classes, hidden=self.hidden,
                    depth=self.depth, features=self.features, sde=self.sde.config())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        with unchecked():
            log_sigma = torch.log(self.sde.sigma(t.double()))
        arg = log_sigma[:, None] * self.freqs.double()[None]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).to(x.dtype)
        return self.net(torch.cat([x.reshape(x.shape[0], -1), emb], dim=1))


def train_classifier(
    classifier: NoisyClassifier,
    x: Tensor,
    labels: Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log: Optional[Callable[[int, float], None]] = None,
) -> NoisyClassifier:
    """Train by cross-entropy on ``x_t = alpha x0 + std eps`` with ``t ~ U(t_min, T)`` (AdamW, cosine decay)."""
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but labels has {labels.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    sde = classifier.sde
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    classifier.train()
    for step in range(int(steps)):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        x0, c = x[idx].float(), labels[idx].long()
        t = sde.t_min + (sde.T - sde.t_min) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        a, s = append_dims(sde.alpha(t).float(), x0.ndim), append_dims(sde.std(t).float(), x0.ndim)
        xt = a * x0 + s * torch.randn(x0.shape, generator=g)
        loss = F.cross_entropy(classifier(xt, t.float()), c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 200 == 0 or step == steps - 1):
            log(step, float(loss))
    classifier.eval()
    return classifier


class MixtureClassifier(nn.Module):
    """The exact noisy classifier of a mixture's component label: ``logits = log w_k + log N_k(x; t)``,
    so ``softmax(logits) = p_t(k | x)`` (the responsibilities)."""

    def __init__(self, mixture: Any, sde: SDE):
        super().__init__()
        self.mixture, self.sde = mixture, sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = self.sde._t(t, x)
        logj, _, _ = self.mixture._components(x, self.sde.alpha(t), self.sde.std(t) ** 2)
        return logj


class ClassifierGuidance(nn.Module):
    """``forward(x, t, y) = eps(x, t) - scale std(t) grad_x log softmax(classifier(x, t))[y]``.

    Args:
        model: unconditional ``model(x, t) -> eps``.
        classifier: ``classifier(x, t) -> logits (B, C)``.
        sde: the SDE (for ``std(t)``).
        scale: guidance scale (1: Bayes' rule; > 1 sharper). A per-call ``scale=`` overrides it.
        label: default target label when ``y`` is not passed (e.g. through a sampler's ``model_kwargs``).

    NFE: that of the sampler; each evaluation adds one classifier forward and backward pass.
    """

    def __init__(self, model: Callable[..., Tensor], classifier: Callable[..., Tensor], sde: SDE,
                 scale: float = 1.0, label: Optional[int] = None):
        super().__init__()
        self.model, self.classifier, self.sde = model, classifier, sde
        self.scale, self.label = float(scale), label

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None, *, scale: Optional[float] = None, **kwargs) -> Tensor:
        w = self.scale if scale is None else float(scale)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if y is None:
            if self.label is None:
                raise ValueError("classifier guidance needs a label: pass y= or set label")
            y = torch.full((x.shape[0],), int(self.label), dtype=torch.long, device=x.device)
        y = torch.as_tensor(y, device=x.device).long().expand(x.shape[0])
        eps = self.model(x, t, **kwargs)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t), dim=1)
            (grad,) = torch.autograd.grad(logp.gather(1, y[:, None]).sum(), xg)
        with unchecked():
            std = append_dims(self.sde.std(t), x.ndim)
        return (eps - w * std * grad).detach()


__all__ = ["NoisyClassifier", "train_classifier", "MixtureClassifier", "ClassifierGuidance"]
