"""Conversions among the four things a diffusion network may predict: eps, score, x0 and v.

With ``x_t = alpha x_0 + std eps`` (any SDE in :mod:`scoresde.sde`):

- score:  ``grad log p_t(x) = -eps / std``                      (Song et al. 2021; Vincent 2011)
- x0:     ``x0 = (x_t - std eps) / alpha``                     (Tweedie's formula via eps)
- v:      ``v = alpha eps - std x0``                          (Salimans & Ho 2022, "Progressive
          distillation"); inverted for any SDE as
          ``x0 = (alpha x_t - std v) / (alpha^2 + std^2)``,
          ``eps = (std x_t + alpha v) / (alpha^2 + std^2)``.

Every function takes the SDE and ``t`` of shape ``(B,)`` and broadcasts over any data rank.
The model contract is ``model(x, t, **kwargs) -> eps``; to wrap a network that predicts x0, v, the
score, an EDM/k-diffusion denoiser or works on discrete timesteps, use :mod:`scoresde.adapters`
(:func:`scoresde.as_eps_model`).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from ._tensor import TimeLike, append_dims
from .sde import SDE

EpsModel = Callable[..., torch.Tensor]


def _scales(sde: SDE, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
    t = sde._t(t, x)
    return append_dims(sde.alpha(t), x.ndim), append_dims(sde.std(t), x.ndim)


def eps_to_score(eps: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``score = -eps / std(t)``."""
    return -eps / append_dims(sde.std(sde._t(t, eps)), eps.ndim)


def score_to_eps(score: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``eps = -std(t) score``."""
    return -score * append_dims(sde.std(sde._t(t, score)), score.ndim)


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """Denoised estimate ``x0 = (x - std eps) / alpha`` (the posterior mean when eps is exact)."""
    a, s = _scales(sde, x, t)
    return (x - s * eps) / a


def x0_to_eps(x: torch.Tensor, x0: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``eps = (x - alpha x0) / std``."""
    a, s = _scales(sde, x, t)
    return (x - a * x0) / s


def score_to_x0(x: torch.Tensor, score: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """Tweedie: ``x0 = (x + std^2 score) / alpha``."""
    a, s = _scales(sde, x, t)
    return (x + s * s * score) / a


def eps_to_v(x: torch.Tensor, eps: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``v = alpha eps - std x0``."""
    a, s = _scales(sde, x, t)
    return a * eps - s * (x - s * eps) / a


def v_to_eps(x: torch.Tensor, v: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``eps = (std x + alpha v) / (alpha^2 + std^2)``."""
    a, s = _scales(sde, x, t)
    return (s * x + a * v) / (a * a + s * s)


def v_to_x0(x: torch.Tensor, v: torch.Tensor, sde: SDE, t: TimeLike) -> torch.Tensor:
    """``x0 = (alpha x - std v) / (alpha^2 + std^2)``."""
    a, s = _scales(sde, x, t)
    return (a * x - s * v) / (a * a + s * s)


class ScoreFunction:
    """Wrap ``model(x, t, **kw) -> eps`` as ``score_fn(x, t, **kw) = -eps / std(t)``."""

    def __init__(self, model: EpsModel, sde: SDE):
        self.model, self.sde = model, sde

    def __call__(self, x: torch.Tensor, t: TimeLike, **model_kwargs) -> torch.Tensor:
        t = self.sde._t(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return eps_to_score(self.model(x, t, **model_kwargs), self.sde, t)


class Denoiser:
    """Wrap ``model(x, t, **kw) -> eps`` as ``denoise(x, t, **kw) -> x0`` (posterior-mean estimate)."""

    def __init__(self, model: EpsModel, sde: SDE):
        self.model, self.sde = model, sde

    def __call__(self, x: torch.Tensor, t: TimeLike, **model_kwargs) -> torch.Tensor:
        t = self.sde._t(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return eps_to_x0(x, self.model(x, t, **model_kwargs), self.sde, t)


def score_fn_from_eps(model: EpsModel, sde: SDE) -> ScoreFunction:
    """``score_fn(x, t) = -model(x, t) / std(t)``."""
    return ScoreFunction(model, sde)


def eps_model_from_score(score_fn: Callable[..., torch.Tensor], sde: SDE) -> EpsModel:
    """The inverse wrapper: turn a score function into ``model(x, t) -> eps = -std(t) score``."""

    def model(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return score_to_eps(score_fn(x, t, **model_kwargs), sde, t)

    return model
