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
integration variable. The adaptive step control reads the error norm on the host once per step.

``method="dopri5"`` (the default) without extra ``options`` runs :func:`dopri5` below: the same
Dormand-Prince 5(4) pair, initial-step rule and step-size controller as torchdiffeq's, so the same
steps and NFE, but with each stage combined by fused in-place adds over a list of stage tensors.
torchdiffeq keeps the stages in one ``(..., 7)`` tensor with the stage axis innermost and combines
them by a broadcast multiply and a sum over that strided axis, asserts ``isfinite`` on the state and
fits a dense-output polynomial every step: ~2.3 ms per evaluation on a 64 x 768 float32 state on one
CPU core, against ~0.3 ms here. Other methods, or any ``options``, go to torchdiffeq.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchdiffeq  # noqa: F401  (registers the _impl modules)
from torchdiffeq import odeint

from scoresde._tensor import unchecked

from .base import Run, SamplingError, all_finite, check_knobs
from ._levels import check_bool, levels, require

_odeint_mod = sys.modules["torchdiffeq._impl.odeint"]
_solvers_mod = sys.modules["torchdiffeq._impl.solvers"]

#: torchdiffeq's methods (read from the installed version) -> True when fixed-grid.
METHODS: Dict[str, bool] = {
    name: issubclass(cls, _solvers_mod.FixedGridODESolver) for name, cls in _odeint_mod.SOLVERS.items()
}

# Dormand-Prince 5(4) (Dormand & Prince 1980; Shampine's dense-output variant in torchdiffeq):
# nodes c, stage weights a (row i builds stage i + 1), 5th-order weights b (= last row of a, FSAL)
# and error weights e = b - b_hat (4th order).
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (
    35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
    -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60,
)


def _rms(v: torch.Tensor) -> float:
    """``sqrt(mean(v^2))`` over all elements, as a float (one host read)."""
    return float(torch.linalg.vector_norm(v)) / math.sqrt(v.numel())


def _combine(y0: torch.Tensor, ks: Sequence[torch.Tensor], weights: Sequence[float], h: float) -> torch.Tensor:
    """``y0 + h sum_j w_j k_j`` (a new tensor), one fused pass per nonzero weight."""
    out = None
    for k, w in zip(ks, weights):
        if w == 0.0:
            continue
        if out is None:
            out = torch.add(y0, k, alpha=h * w)
        else:
            out.add_(k, alpha=h * w)
    return y0.clone() if out is None else out


def dopri5(
    f: Callable[[float, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    s0: float,
    s1: float,
    rtol: float,
    atol: float,
    stops: Sequence[float] = (),
    max_steps: int = 100_000,
) -> Tuple[torch.Tensor, int]:
    """Integrate ``dy/ds = f(s, y)`` from ``s0`` to ``s1`` (either direction) with Dormand-Prince 5(4).

    Controller (torchdiffeq's, so the steps match it): first step by Hairer, Norsett & Wanner
    (II.4): ``sc = atol + rtol |y0|``, ``d0 = rms(y0/sc)``, ``d1 = rms(f0/sc)``,
    ``h0 = 0.01 d0/d1`` (``1e-6`` if either is below ``1e-5``), ``d2 = rms((f(s0 + h0, y0 + h0 f0) -
    f0)/sc)/h0``, ``h = min(100 h0, (0.01 / max(d1, d2))^(1/5))``. Each step:
    ``err = rms(h sum_j e_j k_j / (atol + rtol max(|y0|, |y1|)))``; accept if ``err <= 1``; then
    ``h <- h min(10, max(0.9 err^(-1/5), 0.2 if rejected else 1))`` (``10 h`` if ``err = 0``).
    A step that would pass a point of ``stops`` (or ``s1``) is shortened to end on it. Returns
    ``(y(s1), steps taken)``; raises :class:`SamplingError` on a non-finite error estimate.
    """
    direction = 1.0 if s1 > s0 else -1.0
    ahead = sorted({direction * v for v in (*stops, s1) if direction * v > direction * s0})
    f0 = f(s0, y0)
    sc = torch.abs(y0).mul_(rtol).add_(atol)
    d0, d1 = _rms(y0 / sc), _rms(f0 / sc)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    if not (math.isfinite(d0) and math.isfinite(d1)):
        raise SamplingError(f"dopri5: non-finite state or model output at the start (s = {s0:.6g})")
    f_probe = f(s0 + direction * h0, torch.add(y0, f0, alpha=direction * h0))
    d2 = _rms((f_probe - f0) / sc) / h0
    h1 = max(1e-6, h0 * 1e-3) if d1 <= 1e-15 and d2 <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)  # step length, > 0
    s, y, stop_i, steps = s0, y0, 0, 0
    end = direction * s1
    while direction * s < end:
        while stop_i < len(ahead) - 1 and ahead[stop_i] <= direction * s:
            stop_i += 1  # a stop reached exactly by an unshortened step
        if steps >= max_steps:
            raise SamplingError(f"dopri5 took more than {max_steps} steps before s = {s1:.6g} (stuck at s = {s:.6g})")
        if not math.isfinite(h) or s + direction * h == s:
            raise SamplingError(f"dopri5 step size underflow at s = {s:.6g} (h = {h:.3g}); the model output is probably not finite")
        target = direction * s + h
        on_stop = ahead[stop_i] < target
        s_next = direction * ahead[stop_i] if on_stop else s + direction * h
        dt = s_next - s  # signed
        ks = [f0]
        for c, a in zip(_DP_C, _DP_A):
            yi = _combine(y, ks, a, dt)
            ks.append(f(s_next if c == 1.0 else s + c * dt, yi))
        y1 = yi  # the last stage is evaluated at the 5th-order solution (FSAL)
        err = ks[0].mul(dt * _DP_E[0])
        for k, e in zip(ks[2:], _DP_E[2:]):
            err.add_(k, alpha=dt * e)
        tol = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
        ratio = _rms(err.div_(tol))
        if not math.isfinite(ratio):
            raise SamplingError(f"dopri5: non-finite values at step {steps} (s = {s:.6g} -> {s_next:.6g}); the model output is probably not finite")
        steps += 1
        if ratio <= 1.0:
            s, y, f0 = s_next, y1, ks[-1]
            if on_stop and stop_i < len(ahead) - 1:
                stop_i += 1
        factor = 10.0 if ratio == 0.0 else min(10.0, max(0.9 * ratio ** (-1 / 5), 1.0 if ratio < 1.0 else 0.2))
        h = abs(dt) * factor
    return y, steps


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
    if method == "dopri5" and not options:
        n = lv.steps
        if variable == "log_sigma":
            ends = (math.log(lv.sigma[0]), math.log(lv.sigma[n]))

            def rhs_f(s: float, y: torch.Tensor) -> torch.Tensor:
                with unchecked():
                    tt = sde.t_from_sigma(torch.tensor(math.exp(s), dtype=torch.float64))
                    a = math.exp(float(sde.log_alpha(tt)))
                return run.eps(y * a, float(tt)).mul(math.exp(s))
        else:
            ends = (lv.t[0], lv.t[n])
            one = torch.ones(1, 1, dtype=torch.float64)

            def rhs_f(t: float, x: torch.Tensor) -> torch.Tensor:
                # dx/dt = f(t) x - g(t)^2 score / 2 = f(t) x + g(t)^2 eps / (2 std(t)); coefficients on the host
                tt = torch.tensor([t], dtype=torch.float64)
                with unchecked():
                    fc, g = sde.sde(one, tt)
                    c = 0.5 * float(g) ** 2 / float(sde.std(tt))
                return torch.mul(x, float(fc)).add_(run.eps(x, t), alpha=c)

        y, _ = dopri5(rhs_f, y0, ends[0], ends[1], float(rtol), float(atol))
        if not all_finite(y):
            raise SamplingError(f"dopri5 ended with non-finite values at t = {lv.t[n]:.6g}; the model output is probably not finite")
    else:
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
