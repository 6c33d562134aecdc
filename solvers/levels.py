"""Noise levels of a time grid, the capability check and the free final denoise shared by the
deterministic samplers (DDIM, Heun, DPM-Solver++, the probability-flow ODE).

Every deterministic sampler here works on the scaled state ``y = x / alpha(t)``, for which the
probability-flow ODE of any linear SDE is the same (Karras et al. 2022, eq. 4; Lu et al. 2022):

    dy/dsigma = eps(alpha y, t(sigma)) = (y - D(y, sigma)) / sigma,     sigma = std / alpha,

with ``D`` the denoiser (posterior mean of ``x_0``). In ``lambda = -log sigma`` (half the log-SNR)
it reads ``dy/dlambda = D - y``, whose exact solution over a step of length ``h`` is

    y(lambda + h) = e^{-h} y(lambda) + int_0^h e^{-(h - u)} D(lambda + u) du.

All grid coefficients are computed once in float64 on the host, before the loop, so the loop body
never synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from scoresde._tensor import unchecked
from scoresde.sde import SDE

from .base import time_grid
from .registry import GridOptions, require


@dataclass
class Levels:
    """The grid ``t_0 = t_max > ... > t_N = t_min`` and, per time, ``alpha``, ``std``, ``sigma =
    std/alpha`` and ``lam = -log sigma`` (Python floats, float64)."""

    t: List[float]
    alpha: List[float]
    std: List[float]
    sigma: List[float]
    lam: List[float]

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def levels(sde: SDE, steps: int, schedule: str, t_min: Optional[float], sampler: str, **schedule_kwargs) -> Levels:
    """Build the time grid (:func:`solvers.base.time_grid`) and its noise levels, checking that
    ``sigma`` is positive, finite and strictly decreasing along it."""
    by_schedule = {"logsnr": ["log_snr", "t_from_log_snr"], "karras": ["sigma", "t_from_sigma"], "window": ["sigma", "t_from_sigma"]}
    require(sde, sampler, "alpha", "std", *by_schedule.get(schedule, []))
    return levels_on(sde, time_grid(sde, steps, schedule, t_min=t_min, **schedule_kwargs), sampler,
                     f"schedule {schedule!r} gives a non-monotone one")


def grid_levels(sde: SDE, steps: int, opts: GridOptions, sampler: str, **schedule_kwargs) -> Levels:
    """:class:`Levels` of the grid a :class:`solvers.registry.GridOptions` asks for: its explicit
    ``t_grid`` when given, else :func:`levels` of its ``schedule`` and ``t_min``."""
    if opts.t_grid is not None:
        return levels_on(sde, opts.grid(sde, steps), sampler)
    return levels(sde, steps, opts.schedule, opts.t_min, sampler, **schedule_kwargs)


def levels_on(sde: SDE, grid: torch.Tensor, sampler: str, why: str = "") -> Levels:
    """:class:`Levels` of a given float64 grid of times (any schedule, or one passed in by the user),
    checking that ``sigma`` is positive, finite and strictly decreasing along it."""
    with unchecked():
        a = sde.alpha(grid)
        s = sde.std(grid)
    sig = s / a
    if not bool(torch.isfinite(sig).all()) or not bool((sig > 0).all()):
        raise ValueError(
            f"sampler {sampler!r} needs 0 < std/alpha < inf on its grid; got sigma in "
            f"[{float(sig.min()):.3g}, {float(sig.max()):.3g}] (raise t_min?)"
        )
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"sampler {sampler!r} needs std/alpha strictly decreasing along the grid" + (f"; {why}" if why else ""))
    lam = -torch.log(sig)
    return Levels(grid.tolist(), a.tolist(), s.tolist(), sig.tolist(), lam.tolist())


def final_denoise(y: torch.Tensor, sigma: float, y_last: torch.Tensor, d_last: torch.Tensor, sigma_last: float) -> torch.Tensor:
    """Tweedie's denoise at the final level without a network call.

    ``D(y, sigma) = y + sigma^2 score(y, sigma)``, and the score (in ``y``) from the last evaluation
    ``(D_last - y_last) / sigma_last^2`` is reused. Near ``t_min`` the score of a smooth density
    changes by ``O(sigma^2)`` between the two levels, so the error, ``sigma^2 |score_N - score_last|``,
    is far below the step's own error; reusing ``eps`` instead would err by ``O(sigma sigma_last)``
    because ``eps = -sigma score`` itself shrinks with ``sigma``.
    """
    return y + (sigma / sigma_last) ** 2 * (d_last - y_last)
