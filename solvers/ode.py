"""The probability-flow ODE integrated by torchdiffeq (Song et al. 2021, eq. 13; Chen et al. 2018).

``variable="t"`` (the default) integrates ``dx/dt = f(t) x - g(t)^2 score(x, t) / 2`` as written,
from ``T`` down to ``t_min``. ``variable="log_sigma"`` changes variables first: with ``y = x / alpha``
and ``s = log sigma``, ``sigma = std / alpha``, the ODE of every linear SDE becomes

    dy/ds = sigma eps(alpha y, t(sigma)) = y - D(y, sigma),

whose right-hand side is O(|y|) at every noise level, whereas in ``t`` the VP drift is stiff near
``t = 0`` (``sigma ~ sqrt(t)``: equal steps in ``s`` are geometric steps in ``t``).

Any torchdiffeq method is accepted (:data:`METHODS`). Adaptive ones use ``rtol``/``atol`` and choose
their own steps (``steps`` must then be left unset); fixed-grid ones step on the sampler's time grid
(``steps`` and ``schedule``, or ``t_grid``), mapped to the integration variable. torchdiffeq hides
its internal steps, so the callback is called once, at the end, and the state hook is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torchdiffeq import odeint

from scoresde._tensor import unchecked
from scoresde.ode_methods import ODE_METHODS

from .base import Run, SamplingError
from .levels import grid_levels, levels
from .registry import SCHEDULES, GridOptions, Sampler, knob, require

#: torchdiffeq's method names -> True when the method steps on a given grid (False: adaptive).
METHODS: Dict[str, bool] = {name: not adaptive for name, adaptive in ODE_METHODS.items()}


@dataclass(frozen=True)
class ODEOptions(GridOptions):
    """Options of :func:`ode`."""

    method: str = knob("dopri5", "torchdiffeq method", tuple(METHODS))
    rtol: float = knob(1e-5, "relative tolerance (adaptive methods)")
    atol: float = knob(1e-5, "absolute tolerance (adaptive methods)")
    schedule: str = knob("logsnr", "grid of the fixed-grid methods: a name in solvers.SCHEDULES", tuple(SCHEDULES))
    variable: str = knob("t", "integration variable", ("t", "log_sigma"))
    options: Optional[Dict[str, Any]] = knob(None, "extra torchdiffeq options")

    def check(self) -> None:
        super().check()
        for name in ("rtol", "atol"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be a number in (0, 1); got {getattr(self, name)!r}")
        if not METHODS[self.method] and self.t_grid is not None:
            raise ValueError(f"t_grid needs a fixed-grid method; {self.method!r} chooses its own steps")


def ode(run: Run, steps: int, opts: ODEOptions) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``T`` to ``t_min`` with ``torchdiffeq.odeint``.

    Fixed-grid methods take ``steps`` steps on the grid; adaptive ones step exactly onto the end
    point (``step_t``) and take as many steps as ``rtol``/``atol`` need. ``denoise_final`` returns
    Tweedie's ``x_0`` at ``t_min`` (one more model call).
    """
    sde, x_T = run.sde, run.x
    if x_T.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ode integrates float32 or float64 states; got x_T of dtype {x_T.dtype}")
    fixed = METHODS[opts.method]
    if not fixed and run.steps_given:
        raise ValueError(f"ode with the adaptive method {opts.method!r} chooses its own steps; leave steps unset "
                         f"or use a fixed-grid method ({', '.join(k for k, v in METHODS.items() if v)})")
    lv = grid_levels(sde, steps, opts, "ode") if fixed else levels(sde, 1, "uniform", opts.t_min, "ode")
    dev, dt = x_T.device, x_T.dtype
    if opts.variable == "log_sigma":
        require(sde, "ode", "sigma", "t_from_sigma")
        grid = torch.log(torch.tensor(lv.sigma, dtype=torch.float64)).to(device=dev, dtype=dt)

        def rhs(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = sde.t_from_sigma(torch.exp(s))
            return torch.exp(s) * run.eps(torch.exp(sde.log_alpha(t)) * y, t)

        y0 = x_T / lv.alpha[0]
    else:

        def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            f, g = sde.sde(torch.ones_like(x[:1]), t)  # f(t) * 1 (a (1, ...) tensor) and g(t)
            return f.flatten()[0] * x + 0.5 * g.flatten()[0] ** 2 / sde.std(t) * run.eps(x, t)

        grid = torch.tensor(lv.t, dtype=torch.float64).to(device=dev, dtype=dt)
        y0 = x_T
    options = dict(opts.options or {})
    if not fixed:  # step exactly onto the end point rather than past it (past t_min, t may leave [0, T])
        options.setdefault("step_t", grid[1:])
    try:
        with unchecked():
            y = odeint(rhs, y0, grid, rtol=opts.rtol, atol=opts.atol, method=opts.method, options=options or None)[-1]
    except AssertionError as err:  # torchdiffeq's step-size underflow, e.g. after a non-finite eps
        raise SamplingError(
            f"torchdiffeq {opts.method} failed between t = {lv.t[0]:.6g} and t = {lv.t[-1]:.6g} ({err}); "
            "the model output is probably not finite"
        ) from err
    n = lv.steps
    x = lv.alpha[n] * y if opts.variable == "log_sigma" else y
    d = run.denoise(x, lv.t[n]) if opts.denoise_final else None
    run.report(0, lv.t[n], x, d)
    return d if opts.denoise_final else x


RECORD = Sampler("ode", ode, ODEOptions, 100, False, supports_hook=False,
                 summary="probability-flow ODE through torchdiffeq.odeint (any method)",
                 nfe="the method's evaluations (adaptive: as many as the tolerances need) (+1 with denoise_final)")
