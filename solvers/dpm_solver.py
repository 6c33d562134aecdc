"""Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095) of order 1-3, with an optional corrector that reuses the
next step's evaluation (the UniC idea of Zhao et al. 2023, "UniPC", arXiv 2302.04867).

Data-prediction form in ``lambda = -log sigma = log-SNR / 2`` on ``y = x / alpha`` (see
:mod:`solvers.levels`): over a step ``lambda_i -> lambda_{i+1}``, ``h = lambda_{i+1} - lambda_i``,

    y_{i+1} = e^{-h} y_i + int_0^h e^{-(h - u)} P(u) du,

where ``P`` interpolates the denoiser outputs ``D_i, D_{i-1}, ...`` at their ``lambda``. With ``P``
constant this is DDIM / DPM-Solver++(1); linear gives 2M, quadratic 3M. Unlike the published 2M/3M
formulas, which expand ``P`` in divided differences and truncate the phi-functions, the weights here
integrate the Lagrange polynomial against ``e^{-(h-u)}`` exactly (``phi_k`` functions), so the local
error is ``O(h^{k+1})`` for any spacing of the grid (cf. DEIS, Zhang & Chen 2022, in log-SNR time).

Corrector (``corrector=True``): once ``D_{i+1}`` has been evaluated at the predicted ``y_{i+1}``,
redo the step with ``P`` also interpolating ``D_{i+1}`` (Adams-Moulton instead of Adams-Bashforth),
one order higher, and continue from the corrected state; ``D_{i+1}`` is not re-evaluated, so the
NFE stays one per step. The last step has no corrector (its evaluation would be an extra NFE).
With ``shift_eval``, ``D_{i+1}`` (evaluated at the predicted state) is then moved to the corrected
state to first order, ``D + c (y_corr - y_pred)``, with the slope ``c = s^2 / (s^2 + sigma^2)`` of a
per-sample Gaussian fitted to the two newest evaluations (:func:`shifted_denoise`), so the later
steps interpolate denoiser values consistent with the trajectory they continue (off by default).

Defaults, chosen for accuracy at 10-20 NFE against a tight reference on Gaussian mixtures
(``solvers.reference``; the measurements are in docs/solvers.md): order 3 with the corrector; the
"window" time grid (:func:`solvers.base.window_grid`: log-SNR-uniform steps where the denoiser
changes, larger ones above and below) with the window ``sigma`` in (0.5, 10), in units of the data;
first order over the last two steps (an order-3 extrapolation across the long final log-SNR step is
unstable); and ``final_step="gaussian"``: the last step is solved exactly under a per-sample
isotropic Gaussian posterior fitted to the two newest evaluations (:func:`local_gaussian_step`),
since near ``t_min`` every trajectory sits in one mode. The textbook
solver is ``schedule="logsnr", corrector=False, final_step="dpm"``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch

from scoresde._tensor import append_dims, unchecked
from scoresde.sde import SDE

from .base import Run
from .levels import Levels, final_denoise, grid_levels
from .registry import SCHEDULES, GridOptions, Sampler, knob, require

_MAX_ORDER = 3
_PLAN_BAR_FROM = 2000  # steps from which planning (host work linear in steps) shows a progress bar
_INV_FACT = [1.0 / math.factorial(j) for j in range(40)]


def phi(k: int, h: float) -> float:
    """``phi_k(-h) = int_0^1 e^{-h (1 - v)} v^{k-1} / (k-1)! dv`` for ``k >= 1`` (float64).

    Series ``sum_n (-h)^n / (n + k)!`` for small ``h`` (the recursion ``phi_{k+1}(z) = (phi_k(z) -
    1/k!) / z`` cancels there), the recursion otherwise.
    """
    z = -float(h)
    if abs(z) < 0.5:
        acc, term = 0.0, 1.0  # term = z^n; 25 terms: |z|^25 / 25! < 1e-32
        for n in range(25):
            acc += term * _INV_FACT[n + k]
            term *= z
        return acc
    val = math.expm1(z) / z
    for j in range(1, k):
        val = (val - _INV_FACT[j]) / z
    return val


def exp_weights(nodes: Sequence[float], h: float) -> List[float]:
    """Weights ``w_j`` with ``int_0^h e^{-(h-u)} P(u) du = sum_j w_j P(r_j h)`` exactly for every
    polynomial ``P`` of degree ``< len(nodes)``; ``nodes`` are the ``r_j`` in units of ``h``.

    With moments ``mu_m = int_0^h e^{-(h-u)} (u/h)^m du = h m! phi_{m+1}(-h)`` and the Vandermonde
    matrix ``V_jm = r_j^m``, ``w = V^{-T} mu``: solved in Python float64 by Gaussian elimination with
    partial pivoting (at most 4 x 4, the ``r_j`` are O(1)); pure host arithmetic, no tensor setup.
    """
    k = len(nodes)
    r = [float(v) for v in nodes]
    # rows m of V^T: [r_0^m, ..., r_{k-1}^m | mu_m]
    a = [[rj**m for rj in r] + [h * math.factorial(m) * phi(m + 1, h)] for m in range(k)]
    for c in range(k):
        piv = max(range(c, k), key=lambda i: abs(a[i][c]))
        if a[piv][c] == 0.0:
            raise ValueError(f"nodes must be distinct; got {list(nodes)!r}")
        a[c], a[piv] = a[piv], a[c]
        for i in range(c + 1, k):
            f = a[i][c] / a[c][c]
            if f != 0.0:
                a[i] = [x - f * y for x, y in zip(a[i], a[c])]
    w = [0.0] * k
    for i in range(k - 1, -1, -1):
        w[i] = (a[i][k] - sum(a[i][j] * w[j] for j in range(i + 1, k))) / a[i][i]
    return w


_GL_NODES = 32  # Gauss-Legendre points: the integrands are smooth on one step, exact to ~1e-15


@functools.lru_cache(maxsize=1)
def _gauss_legendre():
    """Gauss-Legendre nodes and weights on [-1, 1] (computed once: an eigenvalue problem)."""
    import numpy as np

    return np.polynomial.legendre.leggauss(_GL_NODES)


def window_weights(node_lams: Sequence[float], lam0: float, lam1: float, sigma_lo: float, sigma_hi: float) -> List[float]:
    """Like :func:`exp_weights`, but ``P`` is the interpolating polynomial in the window grid's own
    variable ``v(sigma) = log((sigma + sigma_hi) / (sigma + sigma_lo))`` (``sigma = e^{-lambda}``)
    instead of in ``lambda``: ``w_j = int_{lam0}^{lam1} e^{-(lam1 - l)} L_j(v(l)) dl`` with the
    Lagrange basis ``L_j`` on the nodes ``v(node_lams)``, by Gauss-Legendre quadrature in float64.

    The window grid is uniform in ``v`` because the denoiser changes at a roughly even rate in it
    (``~ 1/sigma`` above the window, ``~ log sigma`` inside, ``~ sigma`` below), so a low-degree
    polynomial in ``v`` follows ``D`` across the long steps above and below the window, where one in
    ``lambda`` does not (e.g. ``D - mean ~ e^{lambda}`` at high noise). Inside the window ``v ~ -log
    sigma`` and this is :func:`exp_weights` again.
    """
    import numpy as np

    def v(lam_: "np.ndarray") -> "np.ndarray":
        sig = np.exp(-lam_)
        return np.log((sig + sigma_hi) / (sig + sigma_lo))

    x, gw = _gauss_legendre()
    half = 0.5 * (lam1 - lam0)
    u = half * (x + 1.0) + lam0
    kernel = np.exp(-(lam1 - u)) * half * gw
    vu, vn = v(u), v(np.asarray(node_lams, dtype=np.float64))
    out = []
    for j in range(len(vn)):
        basis = np.ones_like(u)
        for k in range(len(vn)):
            if k != j:
                basis *= (vu - vn[k]) / (vn[j] - vn[k])
        out.append(float((kernel * basis).sum()))
    return out


def _gaussian_fit(
    a: Tuple[torch.Tensor, torch.Tensor, float], b: Tuple[torch.Tensor, torch.Tensor, float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample isotropic Gaussian ``N(mu, s^2 I)`` fitted to two evaluations ``(D, y, sigma)``.

    Tweedie, ``mu = D + s^2 score`` with ``score = (D - y) / sigma^2``, must give the same ``mu`` from
    both, so ``s^2 = <D_a - D_b, score_b - score_a> / |score_b - score_a|^2`` (least squares, clamped
    >= 0) and ``mu = D_a + s^2 score_a``. Returns ``(s^2, mu)``, ``s^2`` shaped to broadcast.
    """
    (da, ya, sa), (db, yb, sb) = a, b
    score_a, score_b = (da - ya) / sa**2, (db - yb) / sb**2
    w, dd = (score_b - score_a).flatten(1), (da - db).flatten(1)
    s2 = append_dims(((dd * w).sum(1) / (w * w).sum(1).clamp_min(torch.finfo(w.dtype).tiny)).clamp_min(0.0), da.ndim)
    return s2, da + s2 * score_a


def local_gaussian_step(
    y: torch.Tensor,
    a: Tuple[torch.Tensor, torch.Tensor, float],
    b: Tuple[torch.Tensor, torch.Tensor, float],
    sigma_to: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Last step solved exactly under a per-sample isotropic Gaussian model of the posterior.

    Near the end of sampling each trajectory sits in one mode, where ``D(y, sigma) ~ mu + s^2 /
    (s^2 + sigma^2) (y - mu)`` (exact for Gaussian data). ``a = (D_a, y_a, sigma_a)`` and ``b`` are the
    two newest evaluations, fitted by :func:`_gaussian_fit`. The ODE ``dy/dsigma = sigma (y - mu) /
    (s^2 + sigma^2)`` then has the exact solution ``mu + sqrt((s^2 + sigma_to^2) / (s^2 + sigma_a^2))
    (y - mu)``, and Tweedie's ``x_0`` at ``sigma_to`` is ``mu + s^2 / (s^2 + sigma_to^2) (y_to - mu)``.
    Returns both. No NFE.
    """
    s2, mu = _gaussian_fit(a, b)
    sa = a[2]
    y_to = mu + torch.sqrt((s2 + sigma_to**2) / (s2 + sa**2)) * (y - mu)
    return y_to, mu + s2 / (s2 + sigma_to**2) * (y_to - mu)


def shifted_denoise(
    y: torch.Tensor, a: Tuple[torch.Tensor, torch.Tensor, float], b: Tuple[torch.Tensor, torch.Tensor, float]
) -> torch.Tensor:
    """First-order transport of the newest evaluation ``a = (D_a, y_a, sigma_a)`` to the state ``y``
    at the same ``sigma_a``: ``D(y) ~ D_a + c (y - y_a)``, ``c = s^2 / (s^2 + sigma_a^2)``.

    ``c`` is the slope ``dD/dy`` of the per-sample isotropic Gaussian fitted to ``a`` and ``b``
    (:func:`_gaussian_fit`): exact for Gaussian data, and for a mixture the posterior-covariance
    (Jacobian) estimate along the trajectory. The corrector moves the state from the predicted
    ``y_a``, where ``D_a`` was evaluated, to the corrected ``y``; the next steps then interpolate a
    denoiser consistent with the state they start from instead of the predictor's. No NFE.
    """
    (da, ya, sa), (db, yb, sb) = a, b
    return _shift(y, a, b, (da - ya) / sa**2, (db - yb) / sb**2)[0]


def _shift(
    y: torch.Tensor,
    a: Tuple[torch.Tensor, torch.Tensor, float],
    b: Tuple[torch.Tensor, torch.Tensor, float],
    score_a: torch.Tensor,
    score_b: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`shifted_denoise` given the scores ``(D - y) / sigma^2`` of ``a`` and ``b`` (the sampler
    keeps them, to save passes over the batch); also returns the shifted evaluation's score
    ``(D' - y) / sigma_a^2 = score_a + (c - 1) / sigma_a^2 (y - y_a)``."""
    da, ya, sa = a
    w = torch.sub(score_b, score_a).flatten(1)
    dd = torch.sub(da, b[0]).flatten(1)
    s2 = (torch.linalg.vecdot(dd, w) / torch.linalg.vecdot(w, w).clamp_min(torch.finfo(w.dtype).tiny)).clamp_min_(0.0)
    c = append_dims(s2 / (s2 + sa**2), y.ndim)
    delta = y - ya
    return torch.addcmul(da, c, delta), torch.addcmul(score_a, (c - 1.0) / sa**2, delta)


def _coefficients(value: Any, steps: int) -> Optional[List[Tuple[float, float, float]]]:
    """``None``, or ``steps`` finite triples ``(predictor scale, corrector scale, log-sigma shift)``."""
    if value is None:
        return None
    try:
        out = [tuple(float(v) for v in row) for row in value]
    except (TypeError, ValueError):
        raise ValueError("coefficients must be a sequence of (predictor, corrector, shift) triples") from None
    if len(out) != steps or any(len(row) != 3 or not all(math.isfinite(v) for v in row) for row in out):
        raise ValueError(f"coefficients must hold steps = {steps} finite (predictor, corrector, shift) triples; got {len(out)} rows")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class DPMSolverOptions(GridOptions):
    """Options of :func:`dpm_solver` (see its docstring for what each does)."""

    order: int = knob(3, "multistep order, 1-3")
    corrector: bool = knob(True, "UniC-style corrector reusing the next evaluation (+1 order, no extra NFE)")
    shift_eval: bool = knob(False, "with the corrector, move each reused evaluation to the corrected state")
    schedule: str = knob("window", "time grid: a name in solvers.SCHEDULES", tuple(SCHEDULES))
    window: Tuple[float, float] = knob((0.5, 10.0), "(sigma_lo, sigma_hi) of the 'window' grid, in units of the data")
    lower_order_final: bool = knob(True, "first order over the last two steps")
    final_step: str = knob("gaussian", "last step: exact under a fitted local Gaussian, or the multistep update", ("gaussian", "dpm"))
    interp: str = knob("lambda", "variable of the interpolating polynomial", ("lambda", "window"))
    corrector_order: Optional[int] = knob(None, "cap on the corrector's interpolation points (None: order + 1)")
    coefficients: Any = knob(None, "per-step (predictor, corrector, shift) triples, as fitted by solvers.calibrate_grid")

    def check(self) -> None:
        super().check()
        if not 1 <= self.order <= _MAX_ORDER:
            raise ValueError(f"order must be 1, 2 or 3; got {self.order!r}")
        if not 0 < self.window[0] < self.window[1]:
            raise ValueError(f"window must be a pair (sigma_lo, sigma_hi) with 0 < sigma_lo < sigma_hi; got {self.window!r}")
        if self.interp == "window" and self.schedule != "window":
            raise ValueError(f"interp must be 'lambda', or 'window' with schedule='window'; got {self.interp!r} with schedule={self.schedule!r}")
        if self.corrector_order is not None and not 2 <= self.corrector_order <= _MAX_ORDER + 1:
            raise ValueError(f"corrector_order must be None or an int in [2, {_MAX_ORDER + 1}]; got {self.corrector_order!r}")
        if self.t_grid is not None and self.interp != "lambda":
            raise ValueError(f"t_grid needs interp='lambda'; got interp={self.interp!r}")


def dpm_solver(run: Run, steps: int, opts: DPMSolverOptions) -> torch.Tensor:
    """Multistep DPM-Solver++ of order ``order`` (1-3) on ``steps`` steps: exactly ``steps`` NFE.

    Options (:class:`DPMSolverOptions`): ``order``; ``corrector`` (UniC-style corrector
    reusing the next evaluation, +1 order, no extra NFE); ``shift_eval`` (with the corrector, move
    each reused evaluation to the corrected state, :func:`shifted_denoise`); ``schedule`` (a :data:`solvers.SCHEDULES`
    name or "window"; "logsnr" = uniform steps in ``h``); ``window`` (``(sigma_lo, sigma_hi)`` of the
    "window" grid, in units of the data: scale both with the data's per-coordinate std); ``t_min``; ``interp`` ("lambda": ``P`` a polynomial in ``lambda``; "window": in the window grid's variable,
    :func:`window_weights`); ``corrector_order`` (``None``: the corrector interpolates ``order + 1``
    points; an int caps that, e.g. 3 as in UniPC's default); ``lower_order_final`` (first order over the last
    two steps); ``final_step`` ("gaussian": exact step under a
    fitted local Gaussian, see :func:`local_gaussian_step`; "dpm": the multistep update);
    ``denoise_final`` (return Tweedie's ``x_0`` at ``t_min`` with no extra NFE: from the local
    Gaussian, or by reusing the last score); ``t_grid`` (``None``, or ``steps + 1`` strictly decreasing
    times, or an object with a ``.t`` attribute such as :class:`solvers.calibrate.CalibratedGrid`:
    used instead of ``schedule``/``window``/``t_min``); ``coefficients`` (``None``, or one triple
    ``(p_i, c_i, s_i)`` per step, fitted by :func:`solvers.calibrate_grid` and taken from ``t_grid``
    when it carries them: the predictor's weights become ``w_DDIM + p_i (w - w_DDIM)``, the
    corrector's ``w_pred + c_i (w_corr - w_pred)``, and the network is evaluated at the same ``y``
    with ``sigma_i e^{s_i}``, at most ``sigma(T)``; ``(1, 1, 0)`` is the solver itself, still
    ``steps`` NFE). The first
    steps warm up at lower order (order ``i + 1`` at step ``i``) since only ``i + 1`` evaluations exist yet.
    """
    return integrate(plan(run.sde, steps, opts, progress=run.progress), run, run.x)


@dataclass(frozen=True)
class DPMPlan:
    """Everything :func:`dpm_solver` computes from the grid and the options before touching the
    batch (host floats), built by :func:`plan`: the levels ``lv``, the predictor / corrector weights
    ``pred_w`` / ``corr_w`` and the decay ``e^{-h}`` of each step, and the ``(t, alpha, sigma)`` at
    which the network is evaluated at each step. :func:`integrate` runs it on a batch."""

    lv: Levels
    pred_w: List[List[float]]
    corr_w: List[List[float]]
    decays: List[float]
    eval_t: List[float]
    eval_alpha: List[float]
    eval_sigma: List[float]
    corrector: bool
    shift: bool
    final_gaussian: bool
    denoise: bool


class DPMState(NamedTuple):
    """The loop's state at the start of a step: ``y``, the newest evaluations ``(D_j, y_j, sigma_j)``
    (newest first), the scores kept for ``shift_eval`` and the state the corrector redoes from. Its
    tensors are never modified in place, so a recorded state can be resumed from any number of times."""

    y: torch.Tensor
    evals: Tuple[Tuple[torch.Tensor, torch.Tensor, float], ...]
    scores: Tuple[torch.Tensor, ...]
    y_start: torch.Tensor


def plan(sde: SDE, steps: int, opts: Optional[DPMSolverOptions] = None, *, progress: bool = False,
         **knobs: Any) -> DPMPlan:
    """The :class:`DPMPlan` of a ``steps``-step run with options ``opts`` (or ``knobs``, checked by
    the registry record): the grid (``t_grid``, or ``schedule`` with ``window`` and ``t_min``), and
    every step's weights from it alone, before the loop (no host sync inside it). The weights cost
    host time linear in ``steps``; with ``progress`` a bar shows it for long plans."""
    opts = RECORD.options(opts if opts is not None else knobs)
    order, corrector, shift = opts.order, opts.corrector, opts.shift_eval
    lower_final, interp = opts.lower_order_final, opts.interp
    extra = {"sigma_lo": opts.window[0], "sigma_hi": opts.window[1]} if opts.schedule == "window" else {}
    corr_cap = _MAX_ORDER + 1 if opts.corrector_order is None else opts.corrector_order
    lv = grid_levels(sde, steps, opts, "dpm_solver", **extra)
    coefs = _coefficients(opts.coefficients if opts.coefficients is not None else getattr(opts.t_grid, "coefficients", None), lv.steps)
    n, lam = lv.steps, lv.lam

    def step_order(i: int) -> int:
        p = min(order, i + 1)
        # the last two steps are long in log-SNR (below the window D barely changes, so the grid
        # stretches there): extrapolating a polynomial across them is unstable, so first order
        # (their correctors are second order); measured better than "order n - i" on all ten mixtures
        return 1 if (lower_final and i >= n - 2) else p

    pred_w: List[List[float]] = []
    corr_w: List[List[float]] = []
    decays = [math.exp(-(lam[i + 1] - lam[i])) for i in range(n)]
    rows: Any = range(n)
    if progress and n >= _PLAN_BAR_FROM:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="dpm_solver: planning", leave=False)
    for i in rows:
        h = lam[i + 1] - lam[i]
        p = step_order(i)
        pred_nodes = [(lam[i - j] - lam[i]) / h for j in range(p)]  # 0, r_{-1}, ... (<= 0)
        c_nodes = [1.0] + pred_nodes[: corr_cap - 1]
        if interp == "window":
            lo, hi = extra["sigma_lo"], extra["sigma_hi"]
            pred_w.append(window_weights([lam[i] + r * h for r in pred_nodes], lam[i], lam[i + 1], lo, hi))
            corr_w.append(window_weights([lam[i] + r * h for r in c_nodes], lam[i], lam[i + 1], lo, hi))
        else:
            pred_w.append(exp_weights(pred_nodes, h))
            corr_w.append(exp_weights(c_nodes, h))
        if coefs is not None:
            # w(c) = w_base + c (w - w_base): the predictor's base is DDIM's step (D_i alone), the
            # corrector's the predictor it corrects (no correction); c = 1 is the solver itself
            cp, cc = coefs[i][0], coefs[i][1]
            full_p = pred_w[-1]
            base_p = exp_weights([0.0], h) + [0.0] * (len(full_p) - 1)  # bit-equal to a first-order step's
            pred_w[-1] = [b + cp * (w - b) for b, w in zip(base_p, full_p)]
            # c_i = 0 keeps the prediction: the corrector's nodes are D_{i+1} then the predictor's
            # (all of them, or the newest ones under a corrector_order cap; pad both to one length)
            m = max(len(corr_w[-1]), len(full_p) + 1)
            base_c = [0.0] + pred_w[-1] + [0.0] * (m - len(full_p) - 1)
            full_c = corr_w[-1] + [0.0] * (m - len(corr_w[-1]))
            corr_w[-1] = [b + cc * (w - b) for b, w in zip(base_c, full_c)]

    # where the network is evaluated: at (t_i, sigma_i), or at sigma_i e^{shift_i} for the same y
    eval_t, eval_alpha, eval_sigma = list(lv.t[:n]), list(lv.alpha[:n]), list(lv.sigma[:n])
    if coefs is not None and any(c[2] != 0.0 for c in coefs):
        require(sde, "dpm_solver", "t_from_sigma")
        sig = torch.tensor([lv.sigma[i] * math.exp(coefs[i][2]) for i in range(n)], dtype=torch.float64)
        with unchecked():
            te = torch.minimum(sde.t_from_sigma(sig), torch.tensor(float(sde.T), dtype=torch.float64))
            ae, se = sde.alpha(te), sde.sigma(te)
        for i in range(n):
            if coefs[i][2] != 0.0:
                eval_t[i], eval_alpha[i], eval_sigma[i] = float(te[i]), float(ae[i]), float(se[i])

    return DPMPlan(lv, pred_w, corr_w, decays, eval_t, eval_alpha, eval_sigma, corrector, shift,
                   opts.final_step == "gaussian", opts.denoise_final)


def _advance(decay: float, y0: torch.Tensor, w: List[float], ds: List[torch.Tensor]) -> torch.Tensor:
    """``decay y0 + sum_j w_j D_j``: one fresh tensor, then fused in-place multiply-adds."""
    assert len(ds) >= len(w)
    acc = torch.mul(y0, decay)
    for wj, dj in zip(w, ds):
        acc.add_(dj, alpha=wj)
    return acc


def integrate(plan: DPMPlan, run: Run, x_T: torch.Tensor, resume: Optional[Tuple[int, DPMState]] = None,
              trace: Optional[List[DPMState]] = None) -> torch.Tensor:
    """Run the steps of a :class:`DPMPlan` (the body of :func:`dpm_solver`) from ``x_T``, or from step ``k`` of ``resume = (k, state)``
    (the state recorded at the start of step ``k`` of a run whose steps ``< k`` were the same; the
    result is then bit-identical to the full run's). ``trace``: a list to which the state at the
    start of each step run is appended (used by :func:`solvers.calibrate_grid`, whose coefficient
    search changes one step at a time and reruns only the steps from there)."""
    lv, n = plan.lv, plan.lv.steps
    corrector, shift, denoise = plan.corrector, plan.shift, plan.denoise
    pred_w, corr_w, decays = plan.pred_w, plan.corr_w, plan.decays
    eval_t, eval_alpha, eval_sigma = plan.eval_t, plan.eval_alpha, plan.eval_sigma
    first = 0
    if resume is None:
        y = x_T / lv.alpha[0]  # state in y = x / alpha
        # newest first: (D_j, the y where D_j was evaluated, sigma_j)
        evals: List[Tuple[torch.Tensor, torch.Tensor, float]] = []
        scores: List[torch.Tensor] = []  # (D - y) / sigma^2 of the two newest evals, for shift_eval
        y_start = y  # state at the start of the previous step (the corrector redoes that step)
    else:
        first, state = resume
        y, evals, scores, y_start = state.y, list(state.evals), list(state.scores), state.y_start
    x0: Optional[torch.Tensor] = None
    for i in run.steps(n, "dpm_solver") if first == 0 else range(first, n):
        if trace is not None:
            trace.append(DPMState(y, tuple(evals), tuple(scores), y_start))
        eps = run.eps(eval_alpha[i] * y, eval_t[i])
        d = torch.add(y, eps, alpha=-eval_sigma[i])
        evals.insert(0, (d, y, lv.sigma[i]))  # used as the denoiser at the step's sigma_i, shifted or not
        del evals[_MAX_ORDER + 1 :]  # the corrector of an order-3 step uses 4 points
        if shift and corrector:
            scores.insert(0, torch.mul(eps, -1.0 / lv.sigma[i]))  # (D - y) / sigma^2
            del scores[2:]
        ds = [e[0] for e in evals]
        if corrector and i > 0:
            # Adams-Moulton redo of step i-1 including the new D_i; D_i itself is not re-evaluated.
            y = _advance(decays[i - 1], y_start, corr_w[i - 1], ds)
            if shift:  # move D_i to the corrected state (its slope from the local Gaussian fit)
                d_new, scores[0] = _shift(y, evals[0], evals[1], scores[0], scores[1])
                evals[0] = (d_new, y, lv.sigma[i])
                ds[0] = evals[0][0]
            # the hook sees the state the run continues from: the corrected one
            y = run.hook(i - 1, lv.t[i], y, evals[0][0], scale=lv.alpha[i], t_prev=lv.t[i - 1])
        y_start = y
        if plan.final_gaussian and i == n - 1 and n >= 2:
            y, x0 = local_gaussian_step(y, evals[0], evals[1], lv.sigma[n])
        else:
            y = _advance(decays[i], y, pred_w[i], ds)
        # x = alpha y is finite iff y is (alpha > 0): the report builds x only when someone reads it
        y = run.report(i, lv.t[i + 1], y, d, scale=lv.alpha[i + 1], t_prev=lv.t[i])
    if not denoise:
        return lv.alpha[n] * y
    if x0 is not None:
        return x0
    d_last, y_last, _ = evals[0]
    return final_denoise(y, lv.sigma[n], y_last, d_last, lv.sigma[n - 1])


RECORD = Sampler("dpm_solver", dpm_solver, DPMSolverOptions, 20, False,
                 summary="multistep DPM-Solver++ 1-3 with a UniC-style corrector (the default sampler)")
