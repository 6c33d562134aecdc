"""SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095, the stochastic multistep variant): a second-order sampler of
the reverse SDE with one network evaluation per step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Run
from .levels import grid_levels
from .registry import SCHEDULES, GridOptions, Sampler, knob


@dataclass(frozen=True)
class SDEDPMSolverOptions(GridOptions):
    """Options of :func:`dpmpp_2m_sde` (the log-SNR grid by default)."""

    schedule: str = knob("logsnr", "time grid: a name in solvers.SCHEDULES", tuple(SCHEDULES))
    order: int = knob(2, "1: the DDPM ancestral step; 2: x0 extrapolated linearly in log-SNR", (1, 2))


def dpmpp_2m_sde(run: Run, steps: int, opts: SDEDPMSolverOptions) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) on the grid ``t_0 > ... > t_N``.

    With ``lambda = log(alpha / std)``, ``h_i = lambda_{i+1} - lambda_i`` and Tweedie's
    ``x0_i = (x_i - std_i eps(x_i, t_i)) / alpha_i``::

        x_{i+1} = (std_{i+1} / std_i) e^{-h_i} x_i + alpha_{i+1} (1 - e^{-2 h_i}) D_i
                  + std_{i+1} sqrt(1 - e^{-2 h_i}) z_i,
        D_i = x0_i + (x0_i - x0_{i-1}) h_i / (2 h_{i-1})     (D_0 = x0_0).

    With ``D_i = x0_i`` (``order=1``) this is the DDPM ancestral step of the exact forward kernel;
    the multistep term extrapolates ``x0`` linearly in ``lambda`` at no extra evaluation, which makes
    the step second order in ``h``. ``steps`` NFE (+1 with ``denoise_final``: Tweedie's ``x0`` at
    the last time). Noise: stream ``i`` at step ``i``, per sample.
    """
    lv = grid_levels(run.sde, steps, opts, "dpmpp_2m_sde")
    n = lv.steps
    run.streams = n
    lam = lv.lam  # -log sigma = log(alpha / std)
    x, prev, h_prev = run.x, None, 0.0
    for i in run.steps(n, "dpmpp_2m_sde"):
        eps = run.eps(x, lv.t[i])
        x0 = torch.add(x, eps, alpha=-lv.std[i]).div_(lv.alpha[i])
        h = lam[i + 1] - lam[i]
        d = x0 if (opts.order == 1 or prev is None) else x0 + (x0 - prev) * (h / (2.0 * h_prev))
        e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        x_next = (run.noise(x, i).mul_(lv.std[i + 1] * math.sqrt(e2))
                  .add_(x, alpha=lv.std[i + 1] / lv.std[i] * math.exp(-h)).add_(d, alpha=lv.alpha[i + 1] * e2))
        prev, h_prev = x0, h
        x = run.report(i, lv.t[i + 1], x_next, x0, t_prev=lv.t[i])
    if opts.denoise_final:
        eps = run.eps(x, lv.t[n])
        x0 = torch.add(x, eps, alpha=-lv.std[n]).div_(lv.alpha[n])
        return run.report(n, 0.0, x0, x0, t_prev=lv.t[n])
    return x


RECORD = Sampler("dpmpp_2m_sde", dpmpp_2m_sde, SDEDPMSolverOptions, 50, True,
                 summary="SDE-DPM-Solver++(2M): second-order stochastic multistep (Lu et al. 2022)",
                 nfe="steps (+1 with denoise_final)")
