"""The reference solution the fast samplers are measured against (tests and the peer benchmark).

Convention (the same for every sampler compared):

1. Start from the given ``x_T`` at ``t = T`` (the same noise for every solver).
2. Integrate the probability-flow ODE in the SDE's own time variable, as written by Song et al. 2021
   (eq. 13), ``dx/dt = f(t) x - 1/2 g(t)^2 score(x, t)`` with ``score = -eps/std``, from ``T`` down to
   ``t_min`` with torchdiffeq's ``dopri5`` at ``rtol = atol = 1e-9`` in float64. This deliberately
   uses ``sde.reverse(..., probability_flow=True)``, not the ``sigma``/``lambda`` machinery of the
   samplers under test, so a shared mistake cannot hide.
3. Denoise once at ``t_min`` with Tweedie's formula: ``x_0 = (x + std^2 score) / alpha`` (one more
   model call). With ``denoise=False`` return ``x(t_min)`` itself.

Endpoint error of a sampler = RMS over samples and coordinates of ``sampler(x_T) - reference(x_T)``,
for samplers run with ``denoise_final=True`` (their default; no extra NFE except in ``ode``).

Samplers whose last step jumps to ``sigma = 0`` (k-diffusion, diffusers' ``final_sigmas_type="zero"``)
approximate the ODE solution at ``sigma = 0`` instead; it differs from Tweedie at ``t_min`` by about
``sigma_min^2 / 2 |score|`` (``~3e-4`` for the default VP SDE on the issue-3 ring), far below the errors
compared. On mixtures the RMS is dominated by the few draws near mode boundaries that end in a
different component than the reference (each adds ``~distance / sqrt(2 n)`` in 2-D); count them too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torchdiffeq import odeint

from scoresde._tensor import append_dims, unchecked
from scoresde.parameterization import ScoreFunction
from scoresde.sde import SDE


def reference_solution(
    model: Callable[..., torch.Tensor],
    sde: SDE,
    x_T: torch.Tensor,
    *,
    t_min: Optional[float] = None,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    denoise: bool = True,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """Tight-tolerance probability-flow ODE solution from ``x_T`` (see the module docstring), float64."""
    kw = dict(model_kwargs or {})
    t_min = float(sde.t_min if t_min is None else t_min)
    x = x_T.to(torch.float64)
    flow = sde.reverse(ScoreFunction(model, sde), probability_flow=True)

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flow.sde(x, t.expand(x.shape[0]), **kw)[0]

    ts = torch.tensor([float(sde.T), t_min], dtype=torch.float64)
    with unchecked():
        # step_t = [t_min]: dopri5 steps onto t_min instead of stepping past it and interpolating back
        # (past it, t may go negative where the VP std is undefined).
        x = odeint(f, x, ts, rtol=rtol, atol=atol, method="dopri5", options={"step_t": ts[1:]})[-1]
    if not denoise:
        return x
    t = torch.full((x.shape[0],), t_min, dtype=torch.float64)
    a, s = append_dims(sde.alpha(t), x.ndim), append_dims(sde.std(t), x.ndim)
    return (x + s * s * flow.score_fn(x, t, **kw)) / a


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all samples and coordinates."""
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())
