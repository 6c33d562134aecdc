"""Model-calibrated time grids for :func:`solvers.dpm_solver.dpm_solver` (opt-in).

The idea of "Align Your Steps" (Sabour et al. 2024) and GITS (Chen et al. 2024): where a few-step
solver should place its steps depends on the model, so measure it instead of fixing it. Here the
model is only *called*, never inspected (no mixture parameters, no data):

1. **Screen.** ``pilot_samples`` starting points ``x_T`` from a fixed ``pilot_seed`` (per-sample
   noise, :class:`scoresde.noise.SampleNoise`, independent of any batch the user samples later):
   the first half to fit on, the second to validate on. Each is solved with ``N`` steps on three
   different grids (the default window, a narrower window, uniform in ``t``) and with ``2N`` steps
   on the default grid. At few steps the RMS endpoint error is carried by the few trajectories per
   thousand that end in a wrong mode; those start near a boundary between basins, where cheap
   solvers disagree. The largest squared distance from the ``2N``-step endpoint marks a start as
   *at risk*.
2. **Stratified pilot.** In each half, the ``at_risk`` fraction with the largest disagreement is
   kept whole, and ``typical_samples`` of the rest (evenly spaced by sample id) stand for all of
   the rest, weighted by ``(rest size) / typical_samples``. Only these are solved accurately
   (``pilot_steps`` steps of ``dpm_solver`` on its own grid), and the weighted sum is an unbiased
   estimate of the half's mean squared error for any grid whose mode switches lie in the at-risk
   set. This buys the fit ~30 times more mode-switching trajectories than a plain pilot of equal
   cost (a plain pilot of 8000 saw ~4 at 20 NFE, and its fit chased them: it lost to the default
   grid on fresh noise on 2 of 10 mixtures).
3. **Family of grids.** The default "window" grid of ``dpm_solver`` is warped by a step density:
   with ``s in [0, 1]`` the position along the default grid (``s = i / N`` at its point ``i``), the
   new grid puts its ``N + 1`` points at equal quantiles of the density ``exp(g(s))``, ``g``
   piecewise linear on ``knots`` equally spaced nodes (10 by default). ``g = 0`` is the default
   grid itself; the family has ``knots`` parameters whatever ``N``, so the grid stays smooth and
   cannot be fitted to individual pilot trajectories (free per-point grids were: they lowered the
   pilot's error 100-fold at 20 NFE and not the error on fresh noise). On ten mixtures, 10 knots
   against 6 lowered the geometric-mean RMS endpoint error on fresh noise at 10 NFE by ~10 % and at
   20 NFE by ~33 %, for ~1.5 times the fitting cost.
4. **Fit.** Coordinate descent on the knot values (steps of +-0.5, halved down to 0.0625) minimising
   the fit half's estimated mean squared endpoint error of the ``N``-step solver against its
   accurate endpoints -- the measure the solver is judged by, mode switches included.
5. **Validation.** The fitted warp ``g``, the half-way warp ``g / 2`` and the default grid
   (``g = 0``) are scored the same way on the validation half; the lowest error wins, the default
   on a tie, so a fit is never kept on the strength of the data it was fitted to.
6. **Per-step coefficients** (``coefficients=True``; by default for ``steps <= 15``, see
   :data:`COEFFICIENTS_UP_TO`; the idea of learned solver
   coefficients as in "Bespoke" solvers, Shaul et al. 2023, and S4S, Frankel et al. 2025, here
   fitted by direct search instead of by gradients). On the chosen grid each step gets three
   numbers, ``(1, 1, 0)`` being the solver itself: a scale ``p_i`` of the predictor's higher-order
   part (its weights become ``w_DDIM + p_i (w - w_DDIM)``), a scale ``c_i`` of the corrector's
   (``w_pred + c_i (w_corr - w_pred)``), and a shift ``s_i`` of the noise level at which the network
   is evaluated (``sigma_i e^{s_i}`` for the same ``y = x / alpha``). These stay consistent (the
   weights still sum to the step's ``1 - e^{-h}``, so a constant denoiser is integrated exactly) and
   cost no NFE. Coordinate descent as in step 4 (steps +-0.25 for the scales, +-0.2 for the shift,
   four sizes), on the fit half's estimated error. At 10 NFE they reach what the grid alone cannot
   on wide rings: e.g. validation RMS 0.080 -> 0.059 on ``ring12_wide`` (0.107 default grid).
7. **Validation again.** The fitted coefficients, the half-way ones and none are scored on the
   validation half; the lowest wins, none on a tie.

Cost, paid once per ``(model, sde, sample shape, N)``, in sample-NFE: ``pilot_samples x 5N`` for the
screen, ``(at_risk x pilot_samples + 2 typical_samples) x pilot_steps`` for the accurate solves
and ``(at_risk x pilot_samples / 2 + typical_samples) x N`` per grid tried; a coefficient set
reruns only the steps from the one it changes, about ``0.6 N`` on average (typically 150-450
grids and, at N = 10, 600-2000 coefficient sets): with the defaults 25-62 M sample-NFE at N = 10
(10-20 M for the grid alone) and 19-64 M at N = 20 (grid alone), the cost of sampling 2-6 M
samples. The result, a :class:`CalibratedGrid`, states it (``pilot_cost``) and is passed to the
sampler as ``dpm_solver(..., steps=N, t_grid=grid)``; sampling itself then costs exactly ``N``
NFE. Use :class:`GridCache` to keep one grid per ``N``, and :meth:`CalibratedGrid.save` /
:meth:`CalibratedGrid.load` to keep it across runs (``scoresde calibrate`` / ``sample --grid``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from scoresde.noise import SampleNoise
from scoresde.sde import SDE

from .base import CountingModel, Run, model_device
from .dpm_solver import RECORD as DPM_SOLVER
from .dpm_solver import DPMState, integrate, plan
from .levels import levels

#: knobs of ``dpm_solver`` that a calibrated grid replaces (so they cannot be passed through)
_GRID_KNOBS = ("schedule", "t_grid", "interp")  # (coefficients is an argument of its own)
_FORMAT, _FORMAT_V1 = "scoresde.CalibratedGrid/2", "scoresde.CalibratedGrid/1"
_FINE = 400  # points of the fine default grid the warp interpolates


@dataclass(frozen=True)
class CalibratedGrid:
    """A time grid fitted to a model; pass it as ``dpm_solver(..., steps=grid.steps, t_grid=grid)``.

    ``t``: ``steps + 1`` strictly decreasing times from ``T`` to ``t_min``; ``knots``: the log
    step-density chosen (0 everywhere = the default grid); ``pilot_rms`` / ``default_rms``: estimated
    RMS endpoint error (over the fit half's starts and coordinates) of the ``steps``-step solver on
    this grid / on the default grid, against the accurate solves; ``validation_rms`` /
    ``validation_default_rms``: the same on the validation half, where this grid was chosen;
    ``pilot_samples``: starts screened (half fit, half validation); ``accurate_samples``: those solved
    accurately (at-risk plus typical, both halves); ``pilot_cost``: sample-NFE spent on calibration
    (screen, accurate solves, every tried grid, the validation); ``grids_tried``; ``network_calls``
    (batched model calls made); ``coefficients``: per-step ``(predictor, corrector, shift)`` triples
    for ``dpm_solver`` (``None``: the solver's own), which it reads from this object;
    ``validation_grid_rms``: the validation error of the grid alone, before the coefficients;
    ``coefficients_tried``; ``knobs``: the ``dpm_solver`` knobs it was fitted with (use the same ones
    when sampling).
    """

    t: Tuple[float, ...]
    steps: int
    knots: Tuple[float, ...]
    pilot_rms: float
    default_rms: float
    validation_rms: float
    validation_default_rms: float
    pilot_samples: int
    accurate_samples: int
    pilot_seed: int
    pilot_steps: int
    pilot_cost: int
    grids_tried: int
    network_calls: int
    coefficients: Optional[Tuple[Tuple[float, float, float], ...]] = None
    validation_grid_rms: Optional[float] = None
    coefficients_tried: int = 0
    knobs: Dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write the grid and everything about its fit as JSON (read back with :meth:`load`)."""
        with open(path, "w") as f:
            json.dump({"format": _FORMAT, **dataclasses.asdict(self)}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibratedGrid":
        """Read a grid written by :meth:`save`; a clear ``ValueError`` for anything else."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a calibrated grid from {path}: {e}") from None
        fmt = data.pop("format", None) if isinstance(data, dict) else None
        if fmt not in (_FORMAT, _FORMAT_V1):
            raise ValueError(f"{path} is not a calibrated grid written by CalibratedGrid.save")
        if fmt == _FORMAT_V1:  # grids fitted before per-step coefficients existed: the solver's own
            data.update(coefficients=None, validation_grid_rms=data.get("validation_rms"), coefficients_tried=0)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"{path}: calibrated grid fields {sorted(set(data) ^ names)} missing or unknown")
        knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("knobs").items()}
        coefs = data.pop("coefficients")
        coefs = None if coefs is None else tuple(tuple(float(v) for v in row) for row in coefs)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}, coefficients=coefs, knobs=knobs)


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


#: ``coefficients=None`` fits per-step coefficients up to this many steps. Measured: at 10 steps the
#: validation kept them on 10 of 10 mixtures (validation RMS -2 to -27 %, for 35-92 M sample-NFE,
#: 25-62 M since the search reruns only the changed steps); at 20 steps on 1 of 3 (-4 %), for
#: 185-342 M sample-NFE (before that saving), ten times the grid's own fit (the grid alone is
#: 2.8x-30x better than the best peer there).
COEFFICIENTS_UP_TO = 15

#: coordinate-descent steps of the per-step coefficients (predictor scale, corrector scale, shift)
_COEF_DELTAS = (0.25, 0.25, 0.2)


def _coordinate_descent(
    objective: Callable[[List[float]], float],
    start: Sequence[float],
    start_value: float,
    deltas: Sequence[float],
    max_sweeps: int,
) -> Tuple[List[float], float, int]:
    """Minimise ``objective`` from ``start`` (whose value is ``start_value``): each coordinate in
    turn moves by ``+-delta`` (the first improvement is kept); after a sweep without one the steps
    halve, four sizes in all (``delta`` down to ``delta / 8``). A coordinate whose two moves leave
    the objective bit-identical cannot act on the solver (say the predictor of a first-order step)
    and is not tried again. Returns the point, its value and the number of points tried."""
    x, best, tried, scale, dead = list(start), start_value, 0, 1.0, set()
    for _ in range(max_sweeps):
        improved = False
        for i, delta in enumerate(deltas):
            if i in dead:
                continue
            same = 0
            for sign in (1.0, -1.0):
                cand = list(x)
                cand[i] += sign * delta * scale
                v = objective(cand)
                tried += 1
                same += v == best
                if v < best:
                    best, x, improved = v, cand, True
                    break
            if same == 2:
                dead.add(i)
        if not improved:
            scale /= 2
            if scale < 0.1:
                break
    return x, best, tried


def calibrate_grid(
    model: Callable[..., torch.Tensor],
    sde: SDE,
    sample_shape: Sequence[int],
    *,
    steps: int,
    pilot_samples: int = 64000,
    at_risk: float = 0.05,
    typical_samples: int = 2000,
    pilot_seed: int = 7919,
    pilot_steps: int = 200,
    knots: int = 10,
    coefficients: Optional[bool] = None,
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
    ``pilot_samples``: starts screened (half to fit, half to validate); ``at_risk``: fraction of each
    half kept whole as at risk of a mode switch; ``typical_samples``: how many of the rest of each
    half stand for it. ``knobs``: other ``dpm_solver`` knobs (order, corrector, window, t_min,
    final_step, ...) used for the screen, the accurate solves and the fit; ``schedule``, ``interp``,
    ``t_grid`` and ``coefficients`` are not accepted. ``coefficients``: also fit per-step solver
    coefficients on the chosen grid (steps 6-7 of the module docstring); ``None`` does so for
    ``steps <= COEFFICIENTS_UP_TO`` (15). ``batch_size``: evaluate in chunks of this many samples
    (``None``: all at once). ``progress``: a bar in sample-NFE over the screen and the accurate
    solves, then one over the grids tried (a fit tries ~150-450) and one over the coefficient sets
    (~600-2000 at 10 steps). The coefficient search keeps the per-step states of two runs over the
    fit half (about ``4 steps`` tensors the size of that half's pilot, ``at_risk x pilot_samples / 2
    + typical_samples`` samples). The result depends only on the model, the SDE, the arguments here and
    ``pilot_seed`` -- never on the batch later sampled with it.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an int >= 2; got {steps!r}")
    if coefficients is None:
        coefficients = steps <= COEFFICIENTS_UP_TO
    if not isinstance(coefficients, bool):
        raise ValueError(f"coefficients must be None, True or False (calibrate_grid fits them); got {type(coefficients).__name__}")
    for name, v, lo in (("pilot_samples", pilot_samples, 4), ("pilot_steps", pilot_steps, steps), ("knots", knots, 2),
                        ("max_sweeps", max_sweeps, 1), ("typical_samples", typical_samples, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    if not 0.0 <= float(at_risk) < 1.0:
        raise ValueError(f"at_risk must be a fraction in [0, 1); got {at_risk!r}")
    bad = sorted(set(knobs) & set(_GRID_KNOBS))
    if bad:
        raise ValueError(f"calibrate_grid chooses the grid itself; drop {bad}")
    DPM_SOLVER.options(knobs)  # unknown or bad dpm_solver options fail here, before any work
    shape = tuple(int(d) for d in sample_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"sample_shape must be the non-empty shape of one sample; got {tuple(sample_shape)}")
    o = {**DPM_SOLVER.defaults(), **knobs}
    lo, hi = (float(w) for w in o["window"])
    fine = levels(sde, _FINE, "window", o["t_min"], "calibrate_grid", sigma_lo=lo, sigma_hi=hi)
    t_first, t_last = fine.t[0], fine.t[-1]

    device = model_device(model) if device is None else torch.device(device)
    dtype = dtype or torch.get_default_dtype()
    x_all = sde.prior_std * SampleNoise(int(pilot_seed), torch.arange(pilot_samples)).randn(shape, 0, device=device, dtype=dtype)
    counted = CountingModel(model)
    chunk = None if batch_size is None else max(1, int(batch_size))
    mk = dict(model_kwargs or {})
    cost = [0]
    # cheap solves whose disagreement with a 2N-step one marks a start at risk (step 1)
    screens: List[Dict[str, Any]] = [{}, {"schedule": "uniform"}] + ([{"window": (2 * lo, hi / 2)}] if 4 * lo < hi else [])
    prep_bar = None
    if progress:
        from tqdm.auto import tqdm

        halves = (pilot_samples // 2, pilot_samples - pilot_samples // 2)
        accurate = sum(int(at_risk * h) + min(typical_samples, h - int(at_risk * h)) for h in halves)
        prep = pilot_samples * (2 + len(screens)) * steps + accurate * pilot_steps
        prep_bar = tqdm(total=prep, desc="screen and accurate solves", unit="sample-NFE", unit_scale=True, leave=False)

    def solve(start: torch.Tensor, n: int, first: int = 0, traces: Optional[List[List[DPMState]]] = None,
              record: Optional[List[List[DPMState]]] = None, **kw: Any) -> torch.Tensor:
        """``dpm_solver`` with ``n`` steps from ``start`` in chunks, counting the sample-NFE. With
        ``traces`` (per-chunk states of an earlier run whose steps before ``first`` were those of
        ``kw``), rerun only steps ``first..``: bit-identical to the full run. ``record``: a list
        that receives this run's per-chunk states."""
        kw = {**knobs, **kw}
        if "t_grid" in kw:
            kw.pop("t_min", None)
        plan_ = plan(sde, n, **kw)
        size = start.shape[0] if chunk is None else chunk
        cost[0] += start.shape[0] * (n - first)
        outs = []
        for j, a in enumerate(range(0, start.shape[0], size)):
            part = start[a : a + size]
            resume = (first, traces[j][first]) if first else None
            trace = list(traces[j][:first]) if first else [] if record is not None else None
            outs.append(integrate(plan_, Run(counted, sde, part, model_kwargs=mk), part, resume, trace))
            if record is not None:
                record.append(trace)
            if prep_bar is not None:
                prep_bar.update(outs[-1].shape[0] * n)
        return torch.cat(outs)

    def to_times(knot_values: Sequence[float]) -> List[float]:
        lam = torch.tensor(warp_grid(fine.lam, knot_values, steps), dtype=torch.float64)
        t = sde.t_from_sigma(torch.exp(-lam))
        t[0], t[-1] = t_first, t_last
        return t.tolist()

    with torch.no_grad():
        # 1. screen: disagreement of cheap solvers with a 2N-step one marks starts near a basin boundary
        anchor = solve(x_all, 2 * steps).to(torch.float64)
        risk = torch.zeros(pilot_samples, dtype=torch.float64)  # on the host: it only indexes
        for kw in screens:
            d = (solve(x_all, steps, **kw).to(torch.float64) - anchor).pow(2)
            risk = torch.maximum(risk, d.reshape(pilot_samples, -1).sum(1).cpu())
        del anchor

        # 2. stratified pilot per half: (starts, accurate endpoints, weights summing to 1 per coordinate)
        def stratum(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            order = torch.argsort(risk[ids], descending=True, stable=True)
            k = int(at_risk * len(ids))
            rest = ids[order[k:]].sort().values
            m = min(typical_samples, len(rest))
            typical = rest[torch.linspace(0, len(rest) - 1, m).round().long()] if m else rest
            sel = torch.cat([ids[order[:k]], typical])
            w = torch.cat([torch.ones(k, dtype=torch.float64), torch.full((m,), len(rest) / max(m, 1), dtype=torch.float64)])
            x = x_all[sel]
            ref = solve(x, pilot_steps).to(torch.float64)
            return x, ref, (w / (len(ids) * math.prod(shape))).to(ref.device)

        half = pilot_samples // 2
        fit_set = stratum(torch.arange(half))
        val_set = stratum(torch.arange(half, pilot_samples))

        def weighted_mse(out: torch.Tensor, data: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
            """The stratum's weighted mean squared error of the endpoints ``out`` of its starts."""
            _, ref, w = data
            err = (out.to(torch.float64) - ref).pow(2)
            return float((w * err.reshape(len(w), -1).sum(1)).sum())

        def score(data: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], t_grid: Sequence[float],
                  coefs: Optional[Sequence[Tuple[float, float, float]]] = None) -> float:
            """Estimated mean squared endpoint error of the ``steps``-step solver on the times
            ``t_grid`` with per-step ``coefs``."""
            return weighted_mse(solve(data[0], steps, t_grid=t_grid, coefficients=coefs), data)

        bar = None
        if prep_bar is not None:
            prep_bar.close()
            prep_bar = None
            bar = tqdm(desc=f"fitting a {steps}-step grid", unit="grid", leave=False)

        def mse(knot_values: Sequence[float]) -> float:
            v = score(fit_set, to_times(knot_values))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rms=f"{math.sqrt(v):.3g}")
            return v

        # 3-4. coordinate descent on the warp's knots
        default = mse([0.0] * knots)
        g, best, tried = _coordinate_descent(mse, [0.0] * knots, default, [0.5] * knots, max_sweeps)
        tried += 1
        if bar is not None:
            bar.close()

        def validate(candidates: Sequence[Any], val_of: Callable[[Any], float], fit_of: Callable[[Any], float],
                     known_val: Dict[int, float], known_fit: Dict[int, float]) -> Tuple[int, float, float, int]:
            """Steps 5 and 7: score ``(none, half-way, fitted)`` on the validation half (values already
            known are not recomputed); the lowest wins, the first on a tie. Returns the pick, its
            validation and fit-half scores, and 1 if the fit-half score had to be computed (a try)."""
            scored = [(known_val[i] if i in known_val else val_of(c), i) for i, c in enumerate(candidates)]
            val, pick = min(scored)
            if pick in known_fit:
                return pick, val, known_fit[pick], 0
            return pick, val, fit_of(candidates[pick]), 1

        # 5. validation: the fit, half of it, or the default grid (listed first: it wins ties)
        val_default = score(val_set, to_times([0.0] * knots))
        warps = ([0.0] * knots, [v / 2 for v in g], g)
        pick, val_best, best, extra = validate(warps, lambda c: score(val_set, to_times(c)),
                                               lambda c: score(fit_set, to_times(c)), {0: val_default}, {0: default, 2: best})
        g, tried = warps[pick], tried + extra
        times = to_times(g)
        val_grid = val_best

        # 6-7. per-step solver coefficients on the chosen grid, fitted and validated the same way
        coefs: Optional[List[Tuple[float, float, float]]] = None
        coef_tried = 0
        if coefficients:
            c_bar = tqdm(desc=f"fitting {steps}-step coefficients", unit="set", leave=False) if progress else None

            triples = lambda flat: [tuple(flat[3 * i : 3 * i + 3]) for i in range(steps)]  # noqa: E731
            # A set differs from the descent's current point in one step i, so only steps i.. are
            # rerun, from the current point's recorded states (bit-identical results; at N = 10 the
            # search takes ~40 % fewer sample-NFE). The descent moves iff a value is lower than the
            # current one, the rule that tracks its current point here.
            start = [1.0, 1.0, 0.0] * steps
            current: Dict[str, Any] = {"flat": start, "value": best, "traces": []}
            solve(fit_set[0], steps, record=current["traces"], t_grid=times, coefficients=triples(start))

            def coef_mse(flat: List[float]) -> float:
                cur = current["flat"]
                first = next((i for i in range(steps) if flat[3 * i : 3 * i + 3] != cur[3 * i : 3 * i + 3]), 0)
                traces: List[List[DPMState]] = []
                out = solve(fit_set[0], steps, first, current["traces"], record=traces, t_grid=times, coefficients=triples(flat))
                v = weighted_mse(out, fit_set)
                if v < current["value"]:
                    current.update(flat=list(flat), value=v, traces=traces)
                if c_bar is not None:
                    c_bar.update(1)
                    c_bar.set_postfix(rms=f"{math.sqrt(v):.3g}")
                return v

            flat, fit_mse, coef_tried = _coordinate_descent(coef_mse, start, best, list(_COEF_DELTAS) * steps, max_sweeps)
            del current
            found = triples(flat)
            if c_bar is not None:
                c_bar.close()
            halfway = [(1.0 + (p - 1.0) / 2, 1.0 + (c - 1.0) / 2, sh / 2) for p, c, sh in found]
            sets = (None, halfway, found)
            pick, val_best, best, extra = validate(sets, lambda c: score(val_set, times, c), lambda c: score(fit_set, times, c),
                                                   {0: val_grid}, {0: best, 2: fit_mse})
            coefs, coef_tried = sets[pick], coef_tried + extra
    if not all(b < a for a, b in zip(times, times[1:])):  # pragma: no cover - the warp is monotone
        raise RuntimeError("calibrated grid is not strictly decreasing")
    return CalibratedGrid(
        t=tuple(times), steps=steps, knots=tuple(g), pilot_rms=math.sqrt(best), default_rms=math.sqrt(default),
        validation_rms=math.sqrt(val_best), validation_default_rms=math.sqrt(val_default),
        pilot_samples=pilot_samples, accurate_samples=len(fit_set[0]) + len(val_set[0]), pilot_seed=int(pilot_seed),
        pilot_steps=pilot_steps, pilot_cost=cost[0], grids_tried=tried, network_calls=counted.nfe,
        coefficients=None if coefs is None else tuple(tuple(c) for c in coefs),
        validation_grid_rms=math.sqrt(val_grid), coefficients_tried=coef_tried, knobs=dict(knobs),
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


__all__ = ["COEFFICIENTS_UP_TO", "CalibratedGrid", "GridCache", "calibrate_grid", "warp_grid"]
