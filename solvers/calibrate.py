"""Model-calibrated time grids for :func:`solvers.dpm_solver.dpm_solver` (opt-in).

The idea of "Align Your Steps" (Sabour et al. 2024) and GITS (Chen et al. 2024): where a few-step
solver should place its steps depends on the model, so measure it instead of fixing it. Here the
model is only *called*, never inspected (no mixture parameters, no data):

1. **Pilot.** ``pilot_samples`` starting points ``x_T`` from a fixed ``pilot_seed`` (per-sample
   noise, :class:`scoresde.noise.SampleNoise`, independent of any batch the user samples later), solved
   accurately with ``pilot_steps`` steps of ``dpm_solver`` (its own default grid).
2. **Family of grids.** The default "window" grid of ``dpm_solver`` is warped by a step density:
   with ``s in [0, 1]`` the position along the default grid (``s = i / N`` at its point ``i``), the
   new grid puts its ``N + 1`` points at equal quantiles of the density ``exp(g(s))``, ``g``
   piecewise linear on ``knots`` equally spaced nodes. ``g = 0`` is the default grid itself; the
   family has ``knots`` parameters whatever ``N``, so the grid stays smooth and cannot be fitted
   to individual pilot trajectories (free per-point grids were: they lowered the pilot's error
   100-fold at 20 NFE and not the error on fresh noise).
3. **Fit.** Coordinate descent on the knot values (steps of +-0.5, halved down to 0.0625) minimising
   the pilot's mean squared endpoint error of the ``N``-step solver against the accurate pilot
   endpoints -- the measure the solver is judged by, including the few trajectories that end in a
   wrong mode, which is why the pilot must be large (thousands of samples; with 2000 the fit
   chased the pilot's own mode switches).

Cost, paid once per ``(model, sde, sample shape, N)``: ``pilot_samples x pilot_steps`` sample-NFE
for the accurate pilot plus ``pilot_samples x N`` per tried grid (typically 100-200 grids): e.g.
8000 x (200 + ~150 x 10) ~ 14 M sample-NFE at N = 10, the cost of sampling ~1.4 M samples at 10
NFE. The result, a :class:`CalibratedGrid`, states it (``pilot_cost``) and is passed to the sampler
as ``dpm_solver(..., steps=N, t_grid=grid)``; sampling itself then costs exactly ``N`` NFE. Use
:class:`GridCache` to keep one grid per ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from scoresde.noise import as_sample_noise
from scoresde.sde import SDE

from .base import CountingModel, model_device
from .dpm_solver import KNOBS, dpm_solver
from ._levels import levels

#: knobs of ``dpm_solver`` that a calibrated grid replaces (so they cannot be passed through)
_GRID_KNOBS = ("schedule", "t_grid", "interp")
_FINE = 400  # points of the fine default grid the warp interpolates


@dataclass(frozen=True)
class CalibratedGrid:
    """A time grid fitted to a model; pass it as ``dpm_solver(..., steps=grid.steps, t_grid=grid)``.

    ``t``: ``steps + 1`` strictly decreasing times from ``T`` to ``t_min``; ``knots``: the fitted
    log step-density (0 everywhere = the default grid); ``pilot_rms`` / ``default_rms``: RMS
    endpoint error (over pilot samples and coordinates) of the ``steps``-step solver on this grid /
    on the default grid, against the accurate pilot; ``pilot_cost``: network evaluations x samples
    spent on calibration (accurate pilot plus every tried grid); ``grids_tried``; ``network_calls``
    (batched model calls made, which is ``pilot_cost / pilot_samples`` without ``batch_size``); ``knobs``: the
    ``dpm_solver`` knobs it was fitted with (use the same ones when sampling).
    """

    t: Tuple[float, ...]
    steps: int
    knots: Tuple[float, ...]
    pilot_rms: float
    default_rms: float
    pilot_samples: int
    pilot_seed: int
    pilot_steps: int
    pilot_cost: int
    grids_tried: int
    network_calls: int
    knobs: Dict[str, Any] = field(default_factory=dict)


def warp_grid(base_lam: Sequence[float], knots: Sequence[float], steps: int) -> List[float]:
    """``steps + 1`` values of ``lambda`` at equal quantiles of the density ``exp(g(s))``.

    ``base_lam``: ``lambda`` along a fine default grid, ``s = i / (len - 1)`` at its point ``i``
    (linear in between); ``g``: piecewise linear on ``len(knots)`` equally spaced nodes in
    ``[0, 1]``. With all knots equal the result is the default grid at ``steps`` steps (up to the
    linear interpolation of the fine grid). Ends are kept exactly; the output is strictly monotone
    because the density is positive.
    """
    import numpy as np

    k = len(knots)
    if k < 2:
        raise ValueError(f"need at least 2 knots; got {k}")
    base = np.asarray(base_lam, dtype=np.float64)
    s = np.linspace(0.0, 1.0, 4001)
    dens = np.exp(np.interp(s, np.linspace(0.0, 1.0, k), np.asarray(knots, dtype=np.float64)))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(s))])
    cdf /= cdf[-1]
    sq = np.interp(np.linspace(0.0, 1.0, steps + 1), cdf, s)
    sq[0], sq[-1] = 0.0, 1.0
    lam = np.interp(sq, np.linspace(0.0, 1.0, len(base)), base)
    lam[0], lam[-1] = base[0], base[-1]
    return lam.tolist()


def calibrate_grid(
    model: Callable[..., torch.Tensor],
    sde: SDE,
    sample_shape: Sequence[int],
    *,
    steps: int,
    pilot_samples: int = 8000,
    pilot_seed: int = 7919,
    pilot_steps: int = 200,
    knots: int = 6,
    max_sweeps: int = 40,
    batch_size: Optional[int] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    **knobs: Any,
) -> CalibratedGrid:
    """Fit a ``steps``-step time grid for ``dpm_solver`` to ``model`` (see the module docstring).

    ``sample_shape``: the shape of ONE sample (no batch dimension), e.g. ``(2,)`` or ``(3, 32, 32)``.
    ``knobs``: other ``dpm_solver`` knobs (order, corrector, window, t_min, final_step, ...) used
    for both the pilot and the fit; ``schedule``, ``interp`` and ``t_grid`` are not accepted.
    ``batch_size``: evaluate the pilot in chunks of this many samples (``None``: all at once).
    ``progress``: a bar over the grids tried (a fit tries ~100-200; minutes on a CPU).
    The result depends only on the model, the SDE, the arguments here and ``pilot_seed`` -- never
    on the batch later sampled with it.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an int >= 2; got {steps!r}")
    for name, v, lo in (("pilot_samples", pilot_samples, 2), ("pilot_steps", pilot_steps, steps), ("knots", knots, 2),
                        ("max_sweeps", max_sweeps, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    bad = sorted(set(knobs) & set(_GRID_KNOBS))
    if bad:
        raise ValueError(f"calibrate_grid chooses the grid itself; drop {bad}")
    unknown = sorted(set(knobs) - set(KNOBS["dpm_solver"]))
    if unknown:
        raise TypeError(f"calibrate_grid got unknown dpm_solver option(s) {unknown}")
    shape = tuple(int(d) for d in sample_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"sample_shape must be the non-empty shape of one sample; got {tuple(sample_shape)}")
    o = {**KNOBS["dpm_solver"], **knobs}
    window = o["window"]
    fine = levels(sde, _FINE, "window", o["t_min"], "calibrate_grid", sigma_lo=float(window[0]), sigma_hi=float(window[1]))
    t_first, t_last = fine.t[0], fine.t[-1]

    device = model_device(model) if device is None else torch.device(device)
    dtype = dtype or torch.get_default_dtype()
    noise = as_sample_noise(int(pilot_seed), pilot_samples)
    x_T = sde.prior_std * noise.randn(shape, 0, device=device, dtype=dtype)
    counted = CountingModel(model)
    chunk = pilot_samples if batch_size is None else max(1, int(batch_size))
    solve_kw = dict(knobs)
    mk = dict(model_kwargs or {})

    def solve(n: int, t_grid: Optional[List[float]]) -> torch.Tensor:
        outs = []
        for a in range(0, pilot_samples, chunk):
            kw = dict(solve_kw)
            if t_grid is not None:
                kw.pop("t_min", None)
                kw["t_grid"] = t_grid
            outs.append(dpm_solver(counted, sde, x_T[a : a + chunk], steps=n, model_kwargs=mk, **kw))
        return torch.cat(outs)

    with torch.no_grad():
        ref = solve(pilot_steps, None).to(torch.float64)  # the accurate pilot endpoints, converted once

        def to_times(knot_values: Sequence[float]) -> List[float]:
            lam = torch.tensor(warp_grid(fine.lam, knot_values, steps), dtype=torch.float64)
            t = sde.t_from_sigma(torch.exp(-lam))
            t[0], t[-1] = t_first, t_last
            return t.tolist()

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"calibrating a {steps}-step grid", unit="grid", leave=False)

        def mse(knot_values: Sequence[float]) -> float:
            x = solve(steps, to_times(knot_values))
            v = float((x.to(torch.float64) - ref).pow(2).mean())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rms=f"{math.sqrt(v):.3g}")
            return v

        g = [0.0] * knots
        best = default = mse(g)
        tried, delta = 1, 0.5
        for _ in range(max_sweeps):
            improved = False
            for i in range(knots):
                for sign in (1.0, -1.0):
                    cand = list(g)
                    cand[i] += sign * delta
                    v = mse(cand)
                    tried += 1
                    if v < best:
                        best, g, improved = v, cand, True
                        break
            if not improved:
                delta /= 2
                if delta < 0.06:
                    break
        times = to_times(g)
        if bar is not None:
            bar.close()
    if not all(b < a for a, b in zip(times, times[1:])):  # pragma: no cover - the warp is monotone
        raise RuntimeError("calibrated grid is not strictly decreasing")
    return CalibratedGrid(
        t=tuple(times), steps=steps, knots=tuple(g), pilot_rms=math.sqrt(best), default_rms=math.sqrt(default),
        pilot_samples=pilot_samples, pilot_seed=int(pilot_seed), pilot_steps=pilot_steps,
        pilot_cost=pilot_samples * (pilot_steps + tried * steps), grids_tried=tried, network_calls=counted.nfe, knobs=dict(knobs),
    )


class GridCache:
    """Calibrated grids for one ``(model, sde, sample_shape)``, fitted on first use per ``steps``::

        grids = solvers.GridCache(model, sde, (2,))
        x = solvers.sample(model, sde, (64, 2), sampler="dpm_solver", steps=10, t_grid=grids(10))
    """

    def __init__(self, model: Callable[..., torch.Tensor], sde: SDE, sample_shape: Sequence[int], **calibrate_kwargs: Any):
        self.model, self.sde, self.sample_shape = model, sde, tuple(sample_shape)
        self.calibrate_kwargs = calibrate_kwargs
        self._grids: Dict[int, CalibratedGrid] = {}

    def __call__(self, steps: int) -> CalibratedGrid:
        if steps not in self._grids:
            self._grids[steps] = calibrate_grid(self.model, self.sde, self.sample_shape, steps=steps, **self.calibrate_kwargs)
        return self._grids[steps]


__all__ = ["CalibratedGrid", "GridCache", "calibrate_grid", "warp_grid"]
