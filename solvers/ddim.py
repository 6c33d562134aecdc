"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12) for any linear SDE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Run
from .levels import final_denoise, grid_levels
from .registry import GridOptions, Sampler, knob


@dataclass(frozen=True)
class DDIMOptions(GridOptions):
    """Options of :func:`ddim`."""

    eta: float = knob(0.0, "noise in [0, 1]: 0 deterministic (DDIM), 1 DDPM's ancestral sampler")

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1]; got {self.eta!r}")


def ddim(run: Run, steps: int, opts: DDIMOptions) -> torch.Tensor:
    """DDIM step on the grid ``t_0 > ... > t_N``.

    With ``D = (x_i - std_i eps) / alpha_i`` and ``c = eta std_{i+1} sqrt(1 - SNR_i / SNR_{i+1})``
    (the posterior std of ``q(x_{i+1} | x_i, x_0)`` scaled by ``eta``):

        x_{i+1} = alpha_{i+1} D + sqrt(std_{i+1}^2 - c^2) eps + c z,     z ~ N(0, I).

    ``eta = 0`` is deterministic: Euler in ``sigma`` on ``x/alpha`` (first-order exponential
    integrator, DPM-Solver-1), also for VE where ``alpha = 1``; ``eta = 1`` is DDPM's ancestral
    sampler. Exactly ``steps`` NFE; ``denoise_final`` applies Tweedie at ``t_min`` with the last
    score reused (:func:`solvers.levels.final_denoise`).
    """
    lv = grid_levels(run.sde, steps, opts, "ddim")
    eta = opts.eta
    run.streams = lv.steps  # stream i at step i (eta > 0 only)
    x = run.x
    for i in run.steps(lv.steps, "ddim"):
        eps = run.eps(x, lv.t[i])
        d = (x - lv.std[i] * eps) / lv.alpha[i]
        # 1 - SNR_i/SNR_{i+1} = 1 - exp(-2 h), h = lam_{i+1} - lam_i (lam = -log sigma)
        c = eta * lv.std[i + 1] * math.sqrt(-math.expm1(-2.0 * (lv.lam[i + 1] - lv.lam[i])))
        x_next = lv.alpha[i + 1] * d + math.sqrt(max(lv.std[i + 1] ** 2 - c * c, 0.0)) * eps
        if c > 0:
            x_next = x_next + c * run.noise(x, i)
        x_prev, d_prev = x, d
        x = run.report(i, lv.t[i + 1], x_next, d, t_prev=lv.t[i])
    n = lv.steps
    if opts.denoise_final:
        return final_denoise(x / lv.alpha[n], lv.sigma[n], x_prev / lv.alpha[n - 1], d_prev, lv.sigma[n - 1])
    return x


RECORD = Sampler("ddim", ddim, DDIMOptions, 50, False, summary="DDIM (eta = 0: deterministic, 1: ancestral)")
