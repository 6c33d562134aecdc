"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Run
from .levels import final_denoise, grid_levels
from .registry import GridOptions, SCHEDULES, Sampler, knob


@dataclass(frozen=True)
class HeunOptions(GridOptions):
    """Options of :func:`heun` (the Karras grid by default)."""

    schedule: str = knob("karras", "time grid: a name in solvers.SCHEDULES", tuple(SCHEDULES))


def heun(run: Run, steps: int, opts: HeunOptions) -> torch.Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 ("Elucidating the Design Space...", Algorithm 1).

    On ``y = x/alpha`` in ``sigma``: ``d_i = (y_i - D(y_i, sigma_i)) / sigma_i``, Euler
    ``y' = y_i + (sigma_{i+1} - sigma_i) d_i``, then the trapezoidal correction with
    ``d' = (y' - D(y', sigma_{i+1})) / sigma_{i+1}`` on every step but the last (plain Euler there),
    so ``2 steps - 1`` NFE. ``denoise_final`` reuses the last score (no extra NFE).
    """
    lv = grid_levels(run.sde, steps, opts, "heun")

    def slope(y: torch.Tensor, i: int):
        eps = run.eps(lv.alpha[i] * y, lv.t[i])  # dy/dsigma = eps
        return eps, y - lv.sigma[i] * eps

    n = lv.steps
    y = run.x / lv.alpha[0]
    for i in run.steps(n, "heun"):
        d_i, den = slope(y, i)
        y_last, den_last = y, den
        ds = lv.sigma[i + 1] - lv.sigma[i]
        y_next = y + ds * d_i
        if i < n - 1:
            d_next, _ = slope(y_next, i + 1)
            y_next = y + ds * 0.5 * (d_i + d_next)
        y = run.report(i, lv.t[i + 1], y_next, den, scale=lv.alpha[i + 1], t_prev=lv.t[i])
    if opts.denoise_final:
        return final_denoise(y, lv.sigma[n], y_last, den_last, lv.sigma[n - 1])
    return lv.alpha[n] * y


RECORD = Sampler("heun", heun, HeunOptions, 18, False, summary="Heun's 2nd-order method (EDM, Karras et al. 2022)",
                 nfe="2 steps - 1")
