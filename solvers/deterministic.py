"""Deterministic and fast samplers: DDIM, Heun (EDM), multistep DPM-Solver++ and the probability-flow
ODE through torchdiffeq. All integrate the probability-flow ODE of any linear SDE on ``y = x/alpha``
in ``sigma = std/alpha`` (see :mod:`solvers._levels`), so VP, sub-VP, cosine and VE are one code path.

``DETERMINISTIC`` maps names to functions with the shared signature
``fn(model, sde, x_T, *, steps, generator=None, callback=None, progress=False, model_kwargs=None, **knobs)``;
``KNOBS`` gives each sampler's knobs and their defaults.

NFE: ``ddim`` and ``dpm_solver`` make exactly ``steps`` model calls, ``heun`` ``2 steps - 1``; the
final Tweedie denoise (``denoise_final``) reuses the last evaluation's score (no extra call),
except in ``ode``, where it costs one call.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch

from .base import Run, check_knobs
from ._levels import check_bool, final_denoise, levels
from .dpm_solver import KNOBS as _DPM_KNOBS
from .dpm_solver import dpm_solver
from .ode import KNOBS as _ODE_KNOBS
from .ode import METHODS as ODE_METHODS
from .ode import ode

Callback = Optional[Callable[[Dict[str, Any]], None]]


def ddim(
    model: Callable[..., torch.Tensor],
    sde,
    x_T: torch.Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Callback = None,
    progress: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **knobs: Any,
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12) for any linear SDE.

    With ``D = (x_i - std_i eps) / alpha_i`` and ``c = eta std_{i+1} sqrt(1 - SNR_i / SNR_{i+1})``
    (the posterior std of ``q(x_{i+1} | x_i, x_0)`` scaled by ``eta``):

        x_{i+1} = alpha_{i+1} D + sqrt(std_{i+1}^2 - c^2) eps + c z,     z ~ N(0, I).

    ``eta = 0`` is deterministic: Euler in ``sigma`` on ``x/alpha`` (first-order exponential
    integrator, DPM-Solver-1), also for VE where ``alpha = 1``; ``eta = 1`` is DDPM's ancestral
    sampler. Exactly ``steps`` NFE. Knobs: ``eta`` in [0, 1], ``schedule``, ``t_min``,
    ``denoise_final`` (Tweedie at ``t_min`` with the last score reused; only for ``eta = 0``
    does it use no fresh information, for ``eta > 0`` it is the same formula).
    """
    check_knobs("ddim", knobs, KNOBS["ddim"])
    o = {**KNOBS["ddim"], **knobs}
    eta = o["eta"]
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1]; got {eta!r}")
    eta = float(eta)
    denoise = check_bool("denoise_final", o["denoise_final"])
    lv = levels(sde, steps, o["schedule"], o["t_min"], "ddim")
    run = Run(model, sde, x_T, generator, callback, progress, model_kwargs)
    run.streams = lv.steps  # stream i at step i (eta > 0 only)
    x = x_T
    for i in run.steps(lv.steps, "ddim"):
        eps = run.eps(x, lv.t[i])
        d = (x - lv.std[i] * eps) / lv.alpha[i]
        # 1 - SNR_i/SNR_{i+1} = 1 - exp(-2 h), h = lam_{i+1} - lam_i (lam = -log sigma)
        c = eta * lv.std[i + 1] * math.sqrt(-math.expm1(-2.0 * (lv.lam[i + 1] - lv.lam[i])))
        x_next = lv.alpha[i + 1] * d + math.sqrt(max(lv.std[i + 1] ** 2 - c * c, 0.0)) * eps
        if c > 0:
            x_next = x_next + c * run.noise(x, i)
        x_prev, d_prev = x, d
        x = x_next
        run.report(i, lv.t[i + 1], x, d)
    n = lv.steps
    if denoise:
        return final_denoise(x / lv.alpha[n], lv.sigma[n], x_prev / lv.alpha[n - 1], d_prev, lv.sigma[n - 1])
    return x


def heun(
    model: Callable[..., torch.Tensor],
    sde,
    x_T: torch.Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Callback = None,
    progress: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **knobs: Any,
) -> torch.Tensor:
    """Heun's 2nd-order method, Karras et al. 2022 ("Elucidating the Design Space...", Algorithm 1).

    On ``y = x/alpha`` in ``sigma``: ``d_i = (y_i - D(y_i, sigma_i)) / sigma_i``, Euler
    ``y' = y_i + (sigma_{i+1} - sigma_i) d_i``, then the trapezoidal correction with
    ``d' = (y' - D(y', sigma_{i+1})) / sigma_{i+1}`` on every step but the last (plain Euler there),
    so ``2 steps - 1`` NFE. Knobs: ``schedule`` (default "karras", rho = 7), ``t_min``,
    ``denoise_final``.
    """
    check_knobs("heun", knobs, KNOBS["heun"])
    o = {**KNOBS["heun"], **knobs}
    denoise = check_bool("denoise_final", o["denoise_final"])
    lv = levels(sde, steps, o["schedule"], o["t_min"], "heun")
    run = Run(model, sde, x_T, generator, callback, progress, model_kwargs)

    def slope(y: torch.Tensor, i: int):
        eps = run.eps(lv.alpha[i] * y, lv.t[i])  # dy/dsigma = eps
        return eps, y - lv.sigma[i] * eps

    n = lv.steps
    y = x_T / lv.alpha[0]
    for i in run.steps(n, "heun"):
        d_i, den = slope(y, i)
        y_last, den_last = y, den
        ds = lv.sigma[i + 1] - lv.sigma[i]
        y_next = y + ds * d_i
        if i < n - 1:
            d_next, _ = slope(y_next, i + 1)
            y_next = y + ds * 0.5 * (d_i + d_next)
        y = y_next
        run.report(i, lv.t[i + 1], lv.alpha[i + 1] * y, den)
    if denoise:
        return final_denoise(y, lv.sigma[n], y_last, den_last, lv.sigma[n - 1])
    return lv.alpha[n] * y


DETERMINISTIC: Dict[str, Callable] = {"ddim": ddim, "ode": ode, "heun": heun, "dpm_solver": dpm_solver}

#: sampler name -> {knob: default}, read by the CLI's `samplers` command
KNOBS: Dict[str, Dict[str, object]] = {
    "ddim": {"eta": 0.0, "schedule": "uniform", "t_min": None, "denoise_final": True},
    "heun": {"schedule": "karras", "t_min": None, "denoise_final": True},
    **_ODE_KNOBS,
    **_DPM_KNOBS,
}

__all__ = ["DETERMINISTIC", "KNOBS", "ODE_METHODS", "ddim", "heun", "ode", "dpm_solver"]
