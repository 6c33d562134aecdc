"""Model-calibrated time grids and per-step coefficients for :func:`solvers.dpm_solver.dpm_solver` (opt-in).

The idea of "Align Your Steps" (Sabour et al. 2024) and GITS (Chen et al. 2024): where a few-step
solver should place its steps depends on the model, so measure it instead of fixing it. Here the
model is only *called*, never inspected (no mixture parameters, no data). What is minimised is the
quantity the solver is judged by: the mean squared distance between the endpoint of the ``N``-step
solver and an accurate solve of the same ODE from the same start,

    MSE(grid, coefficients) = E_{x_T ~ prior} |Phi_N(x_T) - Phi_acc(x_T)|^2 / d,

``d`` the number of coordinates of one sample, estimated on a pilot of starts.

1. **Screen** (:meth:`Pilot.screen`). ``pilot_samples`` starts ``x_T`` from a fixed ``pilot_seed``
   (per-sample noise, :class:`scoresde.noise.SampleNoise`, independent of any batch the user samples
   later): the first half to fit on, the second to validate on. Each is solved with ``N`` steps on
   up to three grids (the default window, a narrower window, uniform in ``t``) and with ``2N``
   steps on the default grid. At few steps the error is carried by the rare trajectories that end
   in a wrong mode; those start near a boundary between basins, where cheap solvers disagree. The
   largest squared distance from the ``2N``-step endpoint is a start's *risk*.
2. **Stratified pilot** (:func:`select`, :class:`Stratum`). In each half the ``at_risk`` fraction
   with the largest risk is kept whole, and ``typical_samples`` of the rest (evenly spaced by sample
   id) stand for all of the rest, each weighted by ``(rest size) / typical_samples``. Only these are
   solved accurately (``pilot_steps`` steps of ``dpm_solver`` on its own grid). The weighted mean
   is an unbiased estimate of the half's MSE for any grid whose mode switches lie in the at-risk
   set, and it sees far more mode-switching starts than a plain pilot of equal cost.
3. **Family of grids** (:class:`WarpFamily`, :func:`warp_grid`). The default "window" grid of
   ``dpm_solver`` is warped by a step density: with ``s in [0, 1]`` the position along the default
   grid (``s = i / N`` at its point ``i``), the new grid puts its ``N + 1`` points at equal
   quantiles of the density ``exp(g(s))``, ``g`` piecewise linear on ``knots`` equally spaced nodes.
   ``g = 0`` is the default grid itself; the family has ``knots`` parameters whatever ``N``, so the
   grid stays smooth and cannot be fitted to individual pilot trajectories.
4. **Fit** (:func:`coordinate_descent` on :class:`Objective`). Coordinate descent on the knot
   values (steps of +-0.5, halved down to 0.0625) minimising the fit half's estimated MSE.
5. **Validation** (:func:`validate`). The fitted warp ``g``, the half-way warp ``g / 2`` and the
   default grid (``g = 0``) are scored the same way on the validation half; the lowest error wins,
   the default on a tie, so a fit is never kept on the strength of the data it was fitted to.
6. **Per-step coefficients** (``coefficients=True``; by default for ``steps <= COEFFICIENTS_UP_TO``;
   the idea of learned solver coefficients as in "Bespoke" solvers, Shaul et al. 2023, and S4S,
   Frankel et al. 2025, here fitted by direct search instead of by gradients;
   :class:`CoefficientObjective`). On the chosen grid each step gets three numbers, ``(1, 1, 0)``
   being the solver itself: a scale ``p_i`` of the predictor's higher-order part (its weights become
   ``w_DDIM + p_i (w - w_DDIM)``), a scale ``c_i`` of the corrector's (``w_pred + c_i (w_corr -
   w_pred)``), and a shift ``s_i`` of the noise level at which the network is evaluated (``sigma_i
   e^{s_i}`` for the same ``y = x / alpha``). The weights still sum to the step's ``1 - e^{-h}``
   (a constant denoiser is integrated exactly) and cost no NFE. Coordinate descent as in step 4
   (steps +-0.25 for the scales, +-0.2 for the shift, four sizes) on the fit half's estimated MSE;
   a set differs from the descent's current point in one step ``i``, so only steps ``i..`` are
   rerun, resumed from the states (:class:`solvers.dpm_solver.DPMState`) recorded by the current
   point's run (bit-identical to the full run).
7. **Validation again.** The fitted coefficients, the half-way ones and none are scored on the
   validation half; the lowest wins, none on a tie.

Cost, paid once per ``(model, sde, sample shape, N)``, in sample-NFE: ``pilot_samples x (2 + screens) N``
for the screen, ``(at_risk x pilot_samples + 2 typical_samples) x pilot_steps`` for the accurate
solves, ``(at_risk x pilot_samples / 2 + typical_samples) x N`` per grid tried and, per coefficient
set tried, the same times the fraction of the steps rerun. The result, a :class:`CalibratedGrid`,
states it (``pilot_cost``) and is passed to the sampler as ``dpm_solver(..., steps=N,
t_grid=grid)``; sampling itself then costs exactly ``N`` NFE. Use :class:`GridCache` to keep one
grid per ``N``, and :meth:`CalibratedGrid.save` / :meth:`CalibratedGrid.load` to keep it across
runs (``scoresde calibrate`` / ``sample --grid``). Measured costs, and what each design choice
gained on the benchmark mixtures, are in ``docs/solvers.md`` ("Model-calibrated grids").
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from scoresde.noise import SampleNoise
from scoresde.sde import SDE

from .base import CountingModel, Run, model_device
from .dpm_solver import RECORD as DPM_SOLVER
from .dpm_solver import DPMSolverOptions, DPMState, integrate, plan
from .levels import levels

#: knobs of ``dpm_solver`` that a calibrated grid replaces (so they cannot be passed through)
_GRID_KNOBS = ("schedule", "t_grid", "interp")  # (coefficients is an argument of its own)
_FORMAT, _FORMAT_V1 = "scoresde.CalibratedGrid/2", "scoresde.CalibratedGrid/1"
_FINE = 400  # points of the fine default grid the warp interpolates

Triple = Tuple[float, float, float]


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


#: ``coefficients=None`` fits per-step coefficients up to this many steps (beyond it their fit costs
#: several times the grid's and the validation rarely keeps them; see docs/solvers.md).
COEFFICIENTS_UP_TO = 15

#: coordinate-descent steps of the warp's knots and of the per-step coefficients (predictor scale,
#: corrector scale, shift)
_KNOT_DELTA = 0.5
_COEF_DELTAS = (0.25, 0.25, 0.2)
_UNIT: Triple = (1.0, 1.0, 0.0)  # the solver's own step


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {value!r}")


@dataclass(frozen=True)
class CalibrationSettings:
    """The numeric settings of :func:`calibrate_grid`, checked on construction (one ``ValueError``
    naming the first bad one).

    ``steps``: ``N``, the solver's steps (>= 2); ``pilot_samples``: starts screened, half to fit and
    half to validate (>= 4); ``at_risk``: fraction of each half kept whole as at risk, in ``[0, 1)``;
    ``typical_samples``: starts standing for the rest of each half (>= 1); ``pilot_seed``: seed of
    the starts' per-sample noise; ``pilot_steps``: steps of the accurate solves (>= ``steps``);
    ``knots``: nodes of the warp's log-density (>= 2); ``coefficients``: fit per-step coefficients
    (``None``: up to :data:`COEFFICIENTS_UP_TO` steps, see :attr:`fits_coefficients`);
    ``max_sweeps``: bound on the coordinate-descent sweeps (>= 1).
    """

    steps: int
    pilot_samples: int = 64000
    at_risk: float = 0.05
    typical_samples: int = 2000
    pilot_seed: int = 7919
    pilot_steps: int = 200
    knots: int = 10
    coefficients: Optional[bool] = None
    max_sweeps: int = 40

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 2)
        if self.coefficients is not None and not isinstance(self.coefficients, bool):
            raise ValueError(f"coefficients must be None, True or False (calibrate_grid fits them); got {type(self.coefficients).__name__}")
        for name, lo in (("pilot_samples", 4), ("pilot_steps", self.steps), ("knots", 2), ("max_sweeps", 1), ("typical_samples", 1)):
            _check_int(name, getattr(self, name), lo)
        a = self.at_risk
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 <= a < 1.0:
            raise ValueError(f"at_risk must be a fraction in [0, 1); got {a!r}")
        if isinstance(self.pilot_seed, bool) or not isinstance(self.pilot_seed, int):
            raise ValueError(f"pilot_seed must be an int; got {self.pilot_seed!r}")
        object.__setattr__(self, "at_risk", float(a))

    @property
    def fits_coefficients(self) -> bool:
        """Whether per-step coefficients are fitted: ``coefficients``, or ``steps <= COEFFICIENTS_UP_TO`` when it is ``None``."""
        return self.steps <= COEFFICIENTS_UP_TO if self.coefficients is None else self.coefficients

    @property
    def halves(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample ids of the fit half (the first ``pilot_samples // 2``) and of the validation half."""
        half = self.pilot_samples // 2
        return torch.arange(half), torch.arange(half, self.pilot_samples)

    def selected(self, size: int) -> int:
        """How many starts of a half of ``size`` are solved accurately: the at-risk ones
        ``floor(at_risk x size)`` plus ``min(typical_samples, rest)``."""
        k = int(self.at_risk * size)
        return k + min(self.typical_samples, size - k)


class PilotSolver:
    """``dpm_solver`` over many starts, in chunks, with fixed knobs; counts what it spends.

    ``model`` is wrapped in a :class:`solvers.base.CountingModel` (``network_calls``: batched calls);
    ``cost`` is the sample-NFE spent so far (starts x steps run, summed over calls); ``bar``, when
    set, is a progress bar advanced by each chunk's ``starts x steps``.
    """

    def __init__(self, model: Callable[..., torch.Tensor], sde: SDE, knobs: Dict[str, Any],
                 batch_size: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None):
        self.model, self.sde, self.knobs = CountingModel(model), sde, dict(knobs)
        self.chunk = None if batch_size is None else max(1, int(batch_size))
        self.model_kwargs = dict(model_kwargs or {})
        self.cost = 0
        self.bar: Any = None

    @property
    def network_calls(self) -> int:
        return self.model.nfe

    def solve(self, start: torch.Tensor, steps: int, *, first: int = 0, traces: Optional[List[List[DPMState]]] = None,
              record: Optional[List[List[DPMState]]] = None, **knobs: Any) -> torch.Tensor:
        """Endpoints of ``dpm_solver`` with ``steps`` steps from ``start`` (``knobs`` over the fixed ones).

        ``first`` and ``traces``: rerun only steps ``first..``, resumed from ``traces`` (per chunk,
        the states recorded by an earlier run over the same ``start`` whose steps before ``first``
        were those of these knobs); the result is bit-identical to the full run. ``record``: a list
        that receives this run's states, one list per chunk. Only the steps run are counted.
        """
        kw = {**self.knobs, **knobs}
        if "t_grid" in kw:
            kw.pop("t_min", None)
        steps_plan = plan(self.sde, steps, **kw)
        size = start.shape[0] if self.chunk is None else self.chunk
        self.cost += start.shape[0] * (steps - first)
        outs = []
        for j, a in enumerate(range(0, start.shape[0], size)):
            part = start[a : a + size]
            resume = (first, traces[j][first]) if first else None
            trace = list(traces[j][:first]) if first else [] if record is not None else None
            outs.append(integrate(steps_plan, Run(self.model, self.sde, part, model_kwargs=self.model_kwargs), part, resume, trace))
            if record is not None:
                record.append(trace)
            if self.bar is not None:
                self.bar.update(outs[-1].shape[0] * steps)
        return torch.cat(outs)


def pilot_starts(sde: SDE, sample_shape: Tuple[int, ...], settings: CalibrationSettings,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``pilot_samples`` starts ``x_T = prior_std z``, ``z`` per-sample noise of ``pilot_seed``
    for the ids ``0 .. pilot_samples - 1`` (so a start never depends on the others or on a batch)."""
    noise = SampleNoise(settings.pilot_seed, torch.arange(settings.pilot_samples))
    return sde.prior_std * noise.randn(sample_shape, 0, device=device, dtype=dtype)


def screen_knobs(window: Tuple[float, float]) -> List[Dict[str, Any]]:
    """Knobs of the cheap ``N``-step solves of the screen: the default grid, uniform in ``t``, and
    (when the window is wide enough to narrow, ``4 sigma_lo < sigma_hi``) the window ``(2 sigma_lo, sigma_hi / 2)``."""
    lo, hi = window
    return [{}, {"schedule": "uniform"}] + ([{"window": (2 * lo, hi / 2)}] if 4 * lo < hi else [])


@dataclass(frozen=True)
class Selection:
    """The stratified pilot of one half: ``ids`` (the at-risk starts by decreasing risk, then the
    typical ones by increasing id), their ``weights`` (1 for an at-risk start, ``rest / m`` for each
    of the ``m`` typical ones, so they sum to ``size``) and ``size``, the starts in the half."""

    ids: torch.Tensor
    weights: torch.Tensor
    size: int


def select(risk: torch.Tensor, ids: torch.Tensor, at_risk: float, typical_samples: int) -> Selection:
    """Stratify the half ``ids`` by ``risk`` (one value per start of the whole pilot): the
    ``floor(at_risk x len(ids))`` riskiest are kept whole (ties by position), and ``min(typical_samples,
    rest)`` of the rest, evenly spaced in id order, stand for the rest. ``sum_i w_i e_i`` over the
    selection estimates ``sum`` over the half of any per-start ``e`` without bias when ``e`` does not
    vary systematically with id within the rest."""
    order = torch.argsort(risk[ids], descending=True, stable=True)
    k = int(at_risk * len(ids))
    rest = ids[order[k:]].sort().values
    m = min(typical_samples, len(rest))
    typical = rest[torch.linspace(0, len(rest) - 1, m).round().long()] if m else rest
    w = torch.cat([torch.ones(k, dtype=torch.float64), torch.full((m,), len(rest) / max(m, 1), dtype=torch.float64)])
    return Selection(torch.cat([ids[order[:k]], typical]), w, len(ids))


@dataclass(frozen=True)
class Stratum:
    """A half's pilot, ready to score: the selected starts ``x``, their accurate endpoints ``ref``
    (float64) and ``weights`` ``w_i / (size d)`` (``d`` coordinates per sample), so that
    :meth:`mse` is the half's estimated mean squared error per coordinate."""

    x: torch.Tensor
    ref: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def solve(cls, selection: Selection, x_all: torch.Tensor, solver: PilotSolver, pilot_steps: int) -> "Stratum":
        """The selection's starts from ``x_all`` and their ``pilot_steps``-step endpoints."""
        x = x_all[selection.ids]
        ref = solver.solve(x, pilot_steps).to(torch.float64)
        return cls(x, ref, (selection.weights / (selection.size * math.prod(x.shape[1:]))).to(ref.device))

    def mse(self, out: torch.Tensor) -> float:
        """``sum_i weights_i |out_i - ref_i|^2`` for endpoints ``out`` of the starts ``x``."""
        err = (out.to(torch.float64) - self.ref).pow(2)
        return float((self.weights * err.reshape(len(self.weights), -1).sum(1)).sum())


@dataclass(frozen=True)
class Pilot:
    """The screen's outcome: every start's ``risk`` and the :class:`Selection` of each half."""

    risk: torch.Tensor
    fit: Selection
    validation: Selection

    @classmethod
    def from_risk(cls, risk: torch.Tensor, settings: CalibrationSettings) -> "Pilot":
        """Stratify both halves (:func:`select`) by a given ``risk``."""
        fit_ids, val_ids = settings.halves
        pick = lambda ids: select(risk, ids, settings.at_risk, settings.typical_samples)  # noqa: E731
        return cls(risk, pick(fit_ids), pick(val_ids))

    @classmethod
    def screen(cls, solver: PilotSolver, x_all: torch.Tensor, settings: CalibrationSettings,
               window: Tuple[float, float]) -> "Pilot":
        """Risk of each start: the largest squared distance between the ``2N``-step endpoint and
        the ``N``-step endpoints on the grids of :func:`screen_knobs`; then :meth:`from_risk`."""
        anchor = solver.solve(x_all, 2 * settings.steps).to(torch.float64)
        risk = torch.zeros(x_all.shape[0], dtype=torch.float64)  # on the host: it only indexes
        for kw in screen_knobs(window):
            d = (solver.solve(x_all, settings.steps, **kw).to(torch.float64) - anchor).pow(2)
            risk = torch.maximum(risk, d.reshape(x_all.shape[0], -1).sum(1).cpu())
        return cls.from_risk(risk, settings)

    def strata(self, solver: PilotSolver, x_all: torch.Tensor, pilot_steps: int) -> Tuple[Stratum, Stratum]:
        """The fit and validation :class:`Stratum` (their starts solved accurately)."""
        return Stratum.solve(self.fit, x_all, solver, pilot_steps), Stratum.solve(self.validation, x_all, solver, pilot_steps)


@dataclass(frozen=True)
class WarpFamily:
    """The grids searched: the default "window" grid of ``dpm_solver`` warped by ``exp(g)``
    (:func:`warp_grid`), ``g`` given by its knot values; ``g = 0`` is the default grid."""

    sde: SDE
    steps: int
    base_lam: Tuple[float, ...]
    t_first: float
    t_last: float

    @classmethod
    def around_default(cls, sde: SDE, steps: int, opts: DPMSolverOptions) -> "WarpFamily":
        """The family around the default grid of ``opts`` (its ``window`` and ``t_min``), warped
        from a fine version of it (:data:`_FINE` points)."""
        lo, hi = opts.window
        fine = levels(sde, _FINE, "window", opts.t_min, "calibrate_grid", sigma_lo=lo, sigma_hi=hi)
        return cls(sde, steps, tuple(fine.lam), fine.t[0], fine.t[-1])

    def times(self, knot_values: Sequence[float]) -> List[float]:
        """The ``steps + 1`` decreasing times of the grid of ``g`` (ends exactly the default's)."""
        lam = torch.tensor(warp_grid(self.base_lam, knot_values, self.steps), dtype=torch.float64)
        t = self.sde.t_from_sigma(torch.exp(-lam))
        t[0], t[-1] = self.t_first, self.t_last
        return t.tolist()


class Objective:
    """The estimated MSE of the ``steps``-step solver on ``stratum``: ``objective(t_grid,
    coefficients) = stratum.mse(endpoints)``, each call a full solve of the stratum's starts.
    ``on_value`` (optional) is called with every value computed."""

    def __init__(self, solver: PilotSolver, stratum: Stratum, steps: int, on_value: Optional[Callable[[float], None]] = None):
        self.solver, self.stratum, self.steps, self.on_value = solver, stratum, steps, on_value

    def __call__(self, t_grid: Sequence[float], coefficients: Optional[Sequence[Triple]] = None) -> float:
        v = self.stratum.mse(self.solver.solve(self.stratum.x, self.steps, t_grid=t_grid, coefficients=coefficients))
        if self.on_value is not None:
            self.on_value(v)
        return v


def as_triples(flat: Sequence[float], steps: int) -> List[Triple]:
    """``[p_0, c_0, s_0, p_1, ...]`` as ``steps`` triples ``(p_i, c_i, s_i)``."""
    return [tuple(flat[3 * i : 3 * i + 3]) for i in range(steps)]  # type: ignore[misc]


class CoefficientObjective:
    """``objective(flat)``: the estimated MSE on ``stratum`` of the solver on the fixed ``t_grid``
    with per-step coefficients ``as_triples(flat)``, as :class:`Objective` computes it, but cheaper.

    It tracks the descent's current point (``flat``, ``value``: :func:`coordinate_descent` moves to
    a point iff its value is lower than the current one) and that point's recorded states
    (``traces``). A point first differing from the current one at step ``i`` reruns only steps
    ``i..`` from the state recorded there, bit-identical to the full run. Starts at the solver's
    own coefficients, ``(1, 1, 0)`` per step, whose value is ``start_value``.
    """

    def __init__(self, solver: PilotSolver, stratum: Stratum, steps: int, t_grid: Sequence[float], start_value: float,
                 on_value: Optional[Callable[[float], None]] = None):
        self.solver, self.stratum, self.steps, self.t_grid, self.on_value = solver, stratum, steps, list(t_grid), on_value
        self.flat: List[float] = list(_UNIT) * steps
        self.value = start_value
        self.traces: List[List[DPMState]] = []
        solver.solve(stratum.x, steps, record=self.traces, t_grid=self.t_grid, coefficients=as_triples(self.flat, steps))

    def first_change(self, flat: Sequence[float]) -> int:
        """The first step whose triple differs from the current point's (0 if none does)."""
        cur = self.flat
        return next((i for i in range(self.steps) if list(flat[3 * i : 3 * i + 3]) != cur[3 * i : 3 * i + 3]), 0)

    def __call__(self, flat: Sequence[float]) -> float:
        traces: List[List[DPMState]] = []
        out = self.solver.solve(self.stratum.x, self.steps, first=self.first_change(flat), traces=self.traces, record=traces,
                                t_grid=self.t_grid, coefficients=as_triples(flat, self.steps))
        v = self.stratum.mse(out)
        if v < self.value:
            self.flat, self.value, self.traces = list(flat), v, traces
        if self.on_value is not None:
            self.on_value(v)
        return v


def coordinate_descent(
    objective: Callable[[List[float]], float],
    start: Sequence[float],
    start_value: float,
    deltas: Sequence[float],
    max_sweeps: int,
) -> Tuple[List[float], float, int]:
    """Minimise ``objective`` from ``start`` (whose value is ``start_value``): each coordinate in
    turn moves by ``+-delta`` (the first improvement is kept); after a sweep without one the steps
    halve, four sizes in all (``delta`` down to ``delta / 8``); at most ``max_sweeps`` sweeps. A
    coordinate whose two moves leave the objective bit-identical cannot act on the solver (say the
    predictor of a first-order step) and is not tried again. Returns the point, its value and the
    number of points tried."""
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


@dataclass(frozen=True)
class Choice:
    """What :func:`validate` picked: the candidate's ``index``, its ``validation`` and ``fit``
    scores, and ``computed_fit`` (1 if its fit score had to be computed, a try; else 0)."""

    index: int
    validation: float
    fit: float
    computed_fit: int


def validate(candidates: Sequence[Any], validation_score: Callable[[Any], float], fit_score: Callable[[Any], float],
             known_validation: Optional[Dict[int, float]] = None, known_fit: Optional[Dict[int, float]] = None) -> Choice:
    """Steps 5 and 7 of the module docstring: score every candidate (``none, half-way, fitted``)
    with ``validation_score``, except those whose score ``known_validation`` gives by index; the
    lowest wins, the first listed on a tie. The winner's fit-half score is taken from ``known_fit``
    or computed with ``fit_score``."""
    known_validation, known_fit = known_validation or {}, known_fit or {}
    scored = [(known_validation[i] if i in known_validation else validation_score(c), i) for i, c in enumerate(candidates)]
    val, pick = min(scored)
    if pick in known_fit:
        return Choice(pick, val, known_fit[pick], 0)
    return Choice(pick, val, fit_score(candidates[pick]), 1)


def _bar(enabled: bool, **kw: Any) -> Any:
    """A tqdm bar when ``enabled``, else ``None``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, **kw)


def _ticker(bar: Any) -> Optional[Callable[[float], None]]:
    """``on_value`` that advances ``bar`` by one and shows the RMS of the value (``None`` without a bar)."""
    if bar is None:
        return None

    def tick(v: float) -> None:
        bar.update(1)
        bar.set_postfix(rms=f"{math.sqrt(v):.3g}")

    return tick


@dataclass(frozen=True)
class GridFit:
    """The grid stage's result: chosen ``knots`` and ``times``; ``fit`` / ``validation``: its scores
    on the two halves; ``default_fit`` / ``default_validation``: the default grid's; ``tried``:
    grids scored on the fit half."""

    knots: List[float]
    times: List[float]
    fit: float
    validation: float
    default_fit: float
    default_validation: float
    tried: int


def fit_grid(family: WarpFamily, fit_set: Stratum, val_set: Stratum, solver: PilotSolver,
             settings: CalibrationSettings, progress: bool = False) -> GridFit:
    """Steps 3-5: coordinate descent on the warp's knots from ``g = 0`` on the fit half, then
    :func:`validate` among the default grid, the half-way warp and the fitted one."""
    bar = _bar(progress, desc=f"fitting a {settings.steps}-step grid", unit="grid")
    fit_score = Objective(solver, fit_set, settings.steps)
    val_score = Objective(solver, val_set, settings.steps)
    on_fit = Objective(solver, fit_set, settings.steps, on_value=_ticker(bar))
    zero = [0.0] * settings.knots
    default = on_fit(family.times(zero))
    g, best, tried = coordinate_descent(lambda k: on_fit(family.times(k)), zero, default, [_KNOT_DELTA] * settings.knots,
                                        settings.max_sweeps)
    if bar is not None:
        bar.close()
    val_default = val_score(family.times(zero))
    warps = (zero, [v / 2 for v in g], g)
    choice = validate(warps, lambda k: val_score(family.times(k)), lambda k: fit_score(family.times(k)),
                      {0: val_default}, {0: default, 2: best})
    knots = warps[choice.index]
    return GridFit(knots, family.times(knots), choice.fit, choice.validation, default, val_default,
                   tried + 1 + choice.computed_fit)


@dataclass(frozen=True)
class CoefficientFit:
    """The coefficient stage's result: the chosen ``coefficients`` (``None``: the solver's own),
    their ``fit`` / ``validation`` scores and ``tried``, coefficient sets scored on the fit half."""

    coefficients: Optional[List[Triple]]
    fit: float
    validation: float
    tried: int


def fit_coefficients(grid: GridFit, fit_set: Stratum, val_set: Stratum, solver: PilotSolver,
                     settings: CalibrationSettings, progress: bool = False) -> CoefficientFit:
    """Steps 6-7: coordinate descent on the per-step coefficients on the chosen grid, from the
    solver's own, then :func:`validate` among none, the half-way set and the fitted one."""
    steps = settings.steps
    bar = _bar(progress, desc=f"fitting {steps}-step coefficients", unit="set")
    objective = CoefficientObjective(solver, fit_set, steps, grid.times, grid.fit, on_value=_ticker(bar))
    flat, fit_mse, tried = coordinate_descent(objective, objective.flat, grid.fit, list(_COEF_DELTAS) * steps, settings.max_sweeps)
    del objective  # its recorded states
    if bar is not None:
        bar.close()
    found = as_triples(flat, steps)
    halfway = [(1.0 + (p - 1.0) / 2, 1.0 + (c - 1.0) / 2, sh / 2) for p, c, sh in found]
    sets = (None, halfway, found)
    fit_score = Objective(solver, fit_set, steps)
    val_score = Objective(solver, val_set, steps)
    choice = validate(sets, lambda c: val_score(grid.times, c), lambda c: fit_score(grid.times, c),
                      {0: grid.validation}, {0: grid.fit, 2: fit_mse})
    return CoefficientFit(sets[choice.index], choice.fit, choice.validation, tried + choice.computed_fit)


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
    """Fit a ``steps``-step time grid (and per-step coefficients) for ``dpm_solver`` to ``model``
    (see the module docstring); returns a :class:`CalibratedGrid`.

    ``sample_shape``: the shape of ONE sample (no batch dimension), e.g. ``(2,)`` or ``(3, 32, 32)``.
    ``steps``, ``pilot_samples``, ``at_risk``, ``typical_samples``, ``pilot_seed``, ``pilot_steps``,
    ``knots``, ``coefficients``, ``max_sweeps``: see :class:`CalibrationSettings` (checked there).
    ``knobs``: other ``dpm_solver`` knobs (order, corrector, window, t_min, final_step, ...) used for
    the screen, the accurate solves and the fit; ``schedule``, ``interp``, ``t_grid`` and
    ``coefficients`` are not accepted. ``batch_size``: evaluate in chunks of this many samples
    (``None``: all at once). ``model_kwargs``: passed to every model call. ``device`` / ``dtype`` of
    the starts (default: the model's device, the default dtype). ``progress``: a bar in sample-NFE
    over the screen and the accurate solves, then one over the grids tried and one over the
    coefficient sets. The coefficient search keeps the per-step states of two runs over the fit
    half (about ``4 steps`` tensors the size of that half's pilot, ``at_risk x pilot_samples / 2 +
    typical_samples`` samples). The result depends only on the model, the SDE, the arguments here
    and ``pilot_seed`` -- never on the batch later sampled with it.
    """
    settings = CalibrationSettings(steps=steps, pilot_samples=pilot_samples, at_risk=at_risk, typical_samples=typical_samples,
                                   pilot_seed=pilot_seed, pilot_steps=pilot_steps, knots=knots, coefficients=coefficients,
                                   max_sweeps=max_sweeps)
    bad = sorted(set(knobs) & set(_GRID_KNOBS))
    if bad:
        raise ValueError(f"calibrate_grid chooses the grid itself; drop {bad}")
    opts = DPM_SOLVER.options(knobs)  # unknown or bad dpm_solver options fail here, before any work
    shape = tuple(int(d) for d in sample_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"sample_shape must be the non-empty shape of one sample; got {tuple(sample_shape)}")
    family = WarpFamily.around_default(sde, steps, opts)
    device = model_device(model) if device is None else torch.device(device)
    x_all = pilot_starts(sde, shape, settings, device, dtype or torch.get_default_dtype())
    solver = PilotSolver(model, sde, knobs, batch_size, model_kwargs)
    prep = pilot_samples * (2 + len(screen_knobs(opts.window))) * steps + pilot_steps * sum(
        settings.selected(len(ids)) for ids in settings.halves)
    with torch.no_grad():
        solver.bar = _bar(progress, total=prep, desc="screen and accurate solves", unit="sample-NFE", unit_scale=True)
        pilot = Pilot.screen(solver, x_all, settings, opts.window)
        fit_set, val_set = pilot.strata(solver, x_all, pilot_steps)
        if solver.bar is not None:
            solver.bar.close()
            solver.bar = None
        grid = fit_grid(family, fit_set, val_set, solver, settings, progress)
        coefs = CoefficientFit(None, grid.fit, grid.validation, 0)
        if settings.fits_coefficients:
            coefs = fit_coefficients(grid, fit_set, val_set, solver, settings, progress)
    times = grid.times
    if not all(b < a for a, b in zip(times, times[1:])):  # pragma: no cover - the warp is monotone
        raise RuntimeError("calibrated grid is not strictly decreasing")
    return CalibratedGrid(
        t=tuple(times), steps=steps, knots=tuple(grid.knots), pilot_rms=math.sqrt(coefs.fit),
        default_rms=math.sqrt(grid.default_fit), validation_rms=math.sqrt(coefs.validation),
        validation_default_rms=math.sqrt(grid.default_validation), pilot_samples=pilot_samples,
        accurate_samples=len(fit_set.x) + len(val_set.x), pilot_seed=int(pilot_seed), pilot_steps=pilot_steps,
        pilot_cost=solver.cost, grids_tried=grid.tried, network_calls=solver.network_calls,
        coefficients=None if coefs.coefficients is None else tuple(tuple(c) for c in coefs.coefficients),
        validation_grid_rms=math.sqrt(grid.validation), coefficients_tried=coefs.tried, knobs=dict(knobs),
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


__all__ = ["COEFFICIENTS_UP_TO", "CalibratedGrid", "CalibrationSettings", "Choice", "CoefficientFit", "CoefficientObjective",
           "GridCache", "GridFit", "Objective", "Pilot", "PilotSolver", "Selection", "Stratum", "WarpFamily", "as_triples",
           "calibrate_grid", "coordinate_descent", "fit_coefficients", "fit_grid", "pilot_starts", "screen_knobs", "select",
           "validate", "warp_grid"]
