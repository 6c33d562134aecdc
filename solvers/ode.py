"""The probability-flow ODE integrated by torchdiffeq (Song et al. 2021, eq. 13; Chen et al. 2018).

Change of variables (default ``variable="log_sigma"``): with ``y = x / alpha`` and ``s = log sigma``,
``sigma = std / alpha``, the ODE of every linear SDE becomes

    dy/ds = sigma eps(alpha y, t(sigma)) = y - D(y, sigma),

integrated from ``s = log sigma(T)`` down to ``log sigma(t_min)``. Its right-hand side is O(|y|) at
every noise level, whereas in ``t`` the VP drift is stiff near ``t = 0`` (``sigma ~ sqrt(t)``: equal
steps in ``s`` are geometric steps in ``t``), so adaptive solvers take fewer, better-conditioned
steps. ``variable="t"`` integrates ``dx/dt = f x - 1/2 g^2 score`` as written instead.

Any torchdiffeq method is accepted (:data:`METHODS`). Adaptive ones use ``rtol``/``atol`` and ignore
``steps``; fixed-grid ones step on the sampler's time grid (``steps``, ``schedule``), mapped to the
integration variable. torchdiffeq's adaptive step control reads the error norm on the host once per
step; no other host round-trip happens per evaluation.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional

import torch
import torchdiffeq  # noqa: F401  (registers the _impl modules)
from torchdiffeq import odeint

from scoresde._tensor import unchecked

from .base import Run, SamplingError, check_knobs
from ._levels import check_bool, levels, require

_odeint_mod = sys.modules["torchdiffeq._impl.odeint"]
_solvers_mod = sys.modules["torchdiffeq._impl.solvers"]

#: torchdiffeq's methods (read from the installed version) -> True when fixed-grid.
METHODS: Dict[str, bool] = {
    name: issubclass(cls, _solvers_mod.FixedGridODESolver) for name, cls in _odeint_mod.SOLVERS.items()
}


def ode(
    model: Callable[..., torch.Tensor],
    sde,
    x_T: torch.Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    progress: bool = False,
    model_kwargs: Optional[Dict[str, Any]] = None,
    **knobs: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``T`` to ``t_min`` with ``odeint``.

    Knobs (``KNOBS["ode"]``): ``method`` (any of :data:`METHODS`), ``rtol``, ``atol``, ``schedule``
    (grid of the fixed-step methods, which take ``steps`` steps), ``t_min``, ``variable``
    ("log_sigma" or "t"), ``options`` (extra torchdiffeq options, a dict), ``denoise_final``
    (Tweedie's ``x_0`` at ``t_min``: one more model call). ``callback`` is called once, at the end,
    since torchdiffeq hides its internal steps.
    """
    check_knobs("ode", knobs, KNOBS["ode"])
    o = {**KNOBS["ode"], **knobs}
    method = o["method"]
    if method not in METHODS:
        raise ValueError(f"method must be one of torchdiffeq's {sorted(METHODS)}; got {method!r}")
    rtol, atol = o["rtol"], o["atol"]
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not isinstance(v, (int, float)) or not 0 < float(v) < 1:
            raise ValueError(f"{name} must be a number in (0, 1); got {v!r}")
    variable = o["variable"]
    if variable not in ("log_sigma", "t"):
        raise ValueError(f"variable must be 'log_sigma' or 't'; got {variable!r}")
    options = dict(o["options"] or {})
    denoise = check_bool("denoise_final", o["denoise_final"])
    fixed = METHODS[method]
    run = Run(model, sde, x_T, generator, callback, progress, model_kwargs)
    if fixed:
        lv = levels(sde, steps, o["schedule"], o["t_min"], "ode")
        grid_t = torch.tensor(lv.t, dtype=torch.float64)
    else:
        lv = levels(sde, 1, "uniform", o["t_min"], "ode")
        grid_t = torch.tensor(lv.t, dtype=torch.float64)
    dev, dt = x_T.device, x_T.dtype
    if variable == "log_sigma":
        require(sde, "ode", "sigma", "t_from_sigma")
        grid = torch.log(torch.tensor(lv.sigma, dtype=torch.float64)).to(device=dev, dtype=dt)

        def rhs(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = sde.t_from_sigma(torch.exp(s))
            x = torch.exp(sde.log_alpha(t)) * y
            return torch.exp(s) * run.eps(x, t)

        y0 = x_T / lv.alpha[0]
    else:

        def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            f = -0.5 * sde.beta(t)
            g2 = sde.sde(x[:1], t)[1] ** 2  # g(t)^2, a (1,)-tensor
            return f * x + 0.5 * g2 / sde.std(t) * run.eps(x, t)

        grid = grid_t.to(device=dev, dtype=dt)
        y0 = x_T
    if not fixed:
        # Step exactly onto the end point rather than past it (past t_min, t may leave [0, T]).
        options.setdefault("step_t", grid[1:])
    try:
        with unchecked():
            y = odeint(rhs, y0, grid, rtol=float(rtol), atol=float(atol), method=method, options=options or None)[-1]
    except AssertionError as err:  # torchdiffeq's step-size underflow, e.g. after a non-finite eps
        raise SamplingError(
            f"torchdiffeq {method} failed between t = {lv.t[0]:.6g} and t = {lv.t[-1]:.6g} ({err}); "
            "the model output is probably not finite"
        ) from err
    n = lv.steps
    x = lv.alpha[n] * y if variable == "log_sigma" else y
    d = run.denoise(x, lv.t[n]) if denoise else None
    run.report(0, lv.t[n], x, d)
    return d if denoise else x


KNOBS: Dict[str, Dict[str, object]] = {
    "ode": {
        "method": "dopri5",
        "rtol": 1e-5,
        "atol": 1e-5,
        "schedule": "logsnr",
        "t_min": None,
        "variable": "t",
        "options": None,
        "denoise_final": True,
    }
}
