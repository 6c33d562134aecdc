"""Reverse-SDE samplers: ancestral, Euler-Maruyama, reverse diffusion, predictor-corrector, Langevin, torchsde.

Every sampler has the one signature of :mod:`solvers.base`::

    fn(model, sde, x_T, *, steps, generator=None, callback=None, progress=False, model_kwargs=None, **knobs)

and walks a time grid ``T = t_0 > t_1 > ... > t_N = t_min`` (:func:`solvers.base.time_grid`). Each
step asks the SDE only for ``alpha``, ``std``, the forward coefficients ``f(t) x, g(t)`` and the exact
Gaussian kernel ``transition(s, t)``: ``x_t | x_s ~ N(r x_s, q^2 I)`` with ``r = alpha_t/alpha_s``,
``q^2 = std_t^2 - r^2 std_s^2``. With that, one formula serves VP, sub-VP, cosine-VP and VE alike
(VE is the case ``r = 1``). All randomness is per-sample (``Run.noise``, one stream per draw), so
sample ``i`` of a seed does not depend on the batch it was drawn in.

With ``denoise_final`` (default, as score_sde's ``noise_removal``) the last state at ``t_min`` is
replaced by Tweedie's estimate ``x0 = (x - std eps) / alpha`` at ``t_min``, which costs one more
network evaluation and is reported as step ``N`` at ``t = 0``. score_sde instead returns the
noise-free mean of its last predictor step; both remove the ``std(t_min)`` noise.

Network evaluations (NFE): ``steps`` for the one-evaluation predictors, ``steps * (1 +
corrector_steps)`` for ``pc``, ``steps * corrector_steps`` for ``langevin``, plus one with
``denoise_final``; the torchsde sampler costs what its method costs per step (euler, milstein, euler_heun 1;
srk, midpoint, heun 2).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from scoresde._tensor import append_dims, unchecked
from scoresde.sde import SDE

from .base import Run, check_knobs, time_grid

Tensor = torch.Tensor

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")

#: torchsde methods that integrate our reverse SDE, with the calculus each one assumes. The reverse
#: SDE has additive noise (``g`` depends on t only), so Ito and Stratonovich forms coincide and the
#: Stratonovich methods apply unchanged. Not offered: ``log_ode`` (needs Levy areas beyond space-time)
#: and ``reversible_heun`` (needs the full ``(B, D, D)`` diffusion matrix torchsde builds for additive noise).
TORCHSDE_METHODS: Dict[str, str] = {
    "euler": "ito",
    "milstein": "ito",
    "srk": "ito",
    "midpoint": "stratonovich",
    "heun": "stratonovich",
    "euler_heun": "stratonovich",
}

_COMMON = {"schedule": "uniform", "t_min": None, "denoise_final": True}

#: sampler name -> {knob: default}, read by the CLI's `samplers` command.
KNOBS: Dict[str, Dict[str, object]] = {
    "ancestral": dict(_COMMON),
    "euler_maruyama": dict(_COMMON),
    "reverse_diffusion": dict(_COMMON),
    "pc": {**_COMMON, "predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "corrector_steps": 1},
    "langevin": {**_COMMON, "corrector": "ald", "snr": 0.16, "corrector_steps": 1},
    "sde": {
        **_COMMON,
        "method": "euler",
        "dt": None,
        "adaptive": False,
        "rtol": 1e-5,
        "atol": 1e-4,
        "dt_min": 1e-5,
        "brownian": "sample",
    },
}


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def _options(name: str, knobs: Dict[str, Any]) -> Dict[str, Any]:
    check_knobs(name, knobs, KNOBS[name])
    opts = {**KNOBS[name], **knobs}
    if not isinstance(opts["denoise_final"], bool):
        raise ValueError(f"denoise_final must be True or False; got {opts['denoise_final']!r}")
    return opts


class _Grid:
    """The time grid and every per-step scalar a sampler needs, in float64 (computed once).

    Index ``i`` runs over grid times; step ``i`` goes from ``t[i]`` to ``t[i + 1]`` and uses the
    forward kernel ``x_{t[i]} | x_{t[i+1]} ~ N(r[i] x, q[i]^2)``. The same values are kept as Python
    float lists (``tl``, ``alphal``, ...) so the step loop reads scalars without touching tensors.
    """

    def __init__(self, sde: SDE, steps: int, schedule: str, t_min: Optional[float]):
        self.t = time_grid(sde, steps, schedule, t_min)  # (N + 1,) decreasing
        self.alpha, self.std = sde.alpha(self.t), sde.std(self.t)
        f, g = sde.sde(torch.ones_like(self.t)[:, None], self.t)  # drift f(t) * 1, diffusion g(t)
        self.f, self.g = f[:, 0], g
        self.r, self.q = sde.transition(self.t[1:], self.t[:-1])  # (N,)
        if not bool(torch.all(self.std > 0)) or not bool(torch.all(self.q > 0)):
            raise ValueError(
                "these samplers need std(t) > 0 and a strictly growing noise level between grid times "
                "(transition std > 0); the SDE or the grid does not provide it"
            )
        self.tl, self.alphal, self.stdl = self.t.tolist(), self.alpha.tolist(), self.std.tolist()
        self.fl, self.gl, self.rl, self.ql = self.f.tolist(), self.g.tolist(), self.r.tolist(), self.q.tolist()

    def __len__(self) -> int:
        return len(self.t) - 1


def _norm(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm over all non-batch dims: ``(B, ...) -> (B,)``."""
    return v.reshape(v.shape[0], -1).norm(dim=1)


def _tweedie(x: Tensor, eps: Tensor, alpha: float, std: float) -> Tensor:
    """``x0 = (x - std eps) / alpha`` with host scalars (the grid's precomputed floats): two passes."""
    return torch.add(x, eps, alpha=-std).div_(alpha)


def _finish(run: Run, grid: _Grid, x: Tensor, denoise_final: bool) -> Tensor:
    """Tweedie denoising at ``t_min`` (one more evaluation), reported as step N at t = 0."""
    if not denoise_final:
        return x
    n = len(grid)
    eps = run.eps(x, grid.tl[n])
    x0 = _tweedie(x, eps, grid.alphal[n], grid.stdl[n])
    run.report(n, 0.0, x0, x0)
    return x0


# ---------------------------------------------------------------------------------------------
# Predictors: one step from t[i] to t[i + 1]. Each is linear in the state, the network output and
# fresh noise, x_{i+1} = A_i x_i + B_i eps(x_i, t_i) + C_i z, so each is given by its per-step
# coefficients (computed once, in float64, before the loop) and applied in three fused passes.
# ---------------------------------------------------------------------------------------------
Coeffs = List[Tuple[float, float, float]]


def _coeffs_ancestral(g: _Grid) -> Coeffs:
    """Sample the posterior ``q(x_s | x_t, x0_hat)`` of the forward kernel (DDPM Algorithm 2).

    With ``x_s ~ N(a_s x0, s_s^2)`` and ``x_t | x_s ~ N(r x_s, q^2)``:
    mean ``= (a_s q^2 x0 + r s_s^2 x_t) / s_t^2``, std ``= s_s q / s_t``; with
    ``x0 = (x_t - s_t eps) / a_t`` that is ``A = c0 / a_t + c1``, ``B = -c0 s_t / a_t``,
    ``C = s_s q / s_t`` where ``c0 = a_s q^2 / s_t^2``, ``c1 = r s_s^2 / s_t^2``.
    """
    out = []
    for i in range(len(g)):
        a_t, s_t, a_s, s_s, r, q = g.alphal[i], g.stdl[i], g.alphal[i + 1], g.stdl[i + 1], g.rl[i], g.ql[i]
        c0, c1 = a_s * q * q / (s_t * s_t), r * s_s * s_s / (s_t * s_t)
        out.append((c0 / a_t + c1, -c0 * s_t / a_t, s_s * q / s_t))
    return out


def _coeffs_euler_maruyama(g: _Grid) -> Coeffs:
    """``x_s = x_t - h [f x_t - g^2 score] + g sqrt(h) z`` with ``h = t - s`` (reverse SDE, eq. 6);
    ``g^2 score = -g^2 eps / s_t``, so ``A = 1 - h f``, ``B = -h g^2 / s_t``, ``C = g sqrt(h)``."""
    out = []
    for i in range(len(g)):
        h, f, gt, s_t = g.tl[i] - g.tl[i + 1], g.fl[i], g.gl[i], g.stdl[i]
        out.append((1.0 - h * f, -h * gt * gt / s_t, gt * math.sqrt(h)))
    return out


def _coeffs_reverse_diffusion(g: _Grid) -> Coeffs:
    """Reverse diffusion (Song et al. 2021, eq. 46) on the exact discretisation of the forward SDE.

    Forward: ``x_t = x_s + f_i(x_s) + G_i z`` with ``f_i(x) = (r - 1) x``, ``G_i = q`` (from
    ``transition(s, t)``). Reverse: ``x_s = x_t - f_i(x_t) + G_i^2 score(x_t, t) + G_i z
    = (2 - r) x_t + q^2 score + q z``, i.e. ``A = 2 - r``, ``B = -q^2 / s_t``, ``C = q``. DDPM's
    ``r = sqrt(1 - beta)``, ``q^2 = beta`` and SMLD's ``r = 1``, ``q^2 = sigma_t^2 - sigma_s^2`` are
    the two familiar cases.
    """
    return [(2.0 - g.rl[i], -g.ql[i] ** 2 / g.stdl[i], g.ql[i]) for i in range(len(g))]


_COEFFS: Dict[str, Callable[[_Grid], Coeffs]] = {
    "ancestral": _coeffs_ancestral,
    "euler_maruyama": _coeffs_euler_maruyama,
    "reverse_diffusion": _coeffs_reverse_diffusion,
}


def _predict(run: Run, g: _Grid, x: Tensor, i: int, abc: Tuple[float, float, float], stream: int) -> Tuple[Tensor, Optional[Tensor]]:
    """``x_{i+1} = A x + B eps + C z`` (new tensor; ``x`` and the model's output are not modified) and,
    only when a callback will read it, the denoised estimate ``(x - s_t eps) / a_t`` at ``t[i]``."""
    a, b, c = abc
    eps = run.eps(x, g.tl[i])
    x_new = run.noise(x, stream).mul_(c).add_(x, alpha=a).add_(eps, alpha=b)
    x0 = _tweedie(x, eps, g.alphal[i], g.stdl[i]) if run.callback is not None else None
    return x_new, x0


# ---------------------------------------------------------------------------------------------
# Correctors: Langevin steps at a fixed time s = t[i + 1] targeting p_s.
# ---------------------------------------------------------------------------------------------
def _correct(
    run: Run, g: _Grid, x: Tensor, i: int, kind: str, snr: float, stream: int
) -> Tuple[Tensor, Optional[Tensor]]:
    """One Langevin step ``x <- x + e score + sqrt(2 e) z`` at ``s = t[i + 1]``; ``alpha_i = r_i^2``.

    ``langevin`` (Song et al. 2021, Algorithms 2/3): ``e = 2 alpha_i (snr ||z|| / ||score||)^2``
    with per-sample norms over all non-batch dims. ``ald`` (annealed Langevin dynamics, Song &
    Ermon 2019, in score_sde's form): ``e = 2 alpha_i (snr std_s)^2``, i.e. the same rule with
    ``||z|| / ||score||`` replaced by its typical value ``std_s`` (``||score|| ~ sqrt(D) / std``).
    With ``score = -eps / std_s`` the step is ``x + sqrt(2 e) z - (e / std_s) eps``.
    """
    s_idx = i + 1
    a_s, s_s, alpha_i = g.alphal[s_idx], g.stdl[s_idx], g.rl[i] ** 2
    eps = run.eps(x, g.tl[s_idx])
    z = run.noise(x, stream)
    if kind == "langevin":
        score_norm = (_norm(eps) / s_s).clamp_min(torch.finfo(x.dtype).tiny)
        e = 2.0 * alpha_i * (snr * _norm(z) / score_norm) ** 2  # (B,)
        x_new = z.mul_(append_dims(torch.sqrt(2.0 * e), x.ndim)).add_(x).addcmul_(eps, append_dims(-e / s_s, x.ndim))
    else:  # ald
        e = 2.0 * alpha_i * (snr * s_s) ** 2
        x_new = z.mul_(math.sqrt(2.0 * e)).add_(x).add_(eps, alpha=-e / s_s)
    x0 = _tweedie(x, eps, a_s, s_s) if run.callback is not None else None
    return x_new, x0


def _pc_loop(
    name: str,
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    steps: int,
    generator: Any,
    callback: Any,
    progress: bool,
    model_kwargs: Optional[dict],
    opts: Dict[str, Any],
) -> Tensor:
    predictor = opts.get("predictor", "none")
    corrector = opts.get("corrector", "none")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {list(PREDICTORS)}; got {predictor!r}")
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {list(CORRECTORS)}; got {corrector!r}")
    n_corr = opts.get("corrector_steps", 0) if corrector != "none" else 0
    if not isinstance(n_corr, int) or isinstance(n_corr, bool) or n_corr < 0:
        raise ValueError(f"corrector_steps must be a non-negative integer; got {n_corr!r}")
    snr = float(opts.get("snr", 0.16))
    if corrector != "none" and not snr > 0:
        raise ValueError(f"snr must be positive; got {snr!r}")
    if predictor == "none" and n_corr == 0:
        raise ValueError("with predictor 'none' the corrector must be 'langevin' or 'ald' with corrector_steps >= 1")

    run = Run(model, sde, x_T, generator, callback, progress, model_kwargs or {})
    grid = _Grid(sde, steps, opts["schedule"], opts["t_min"])
    first = 0 if predictor == "none" else 1  # the predictor's stream, if any, comes first
    per_step = first + n_corr  # noise streams used per step
    run.streams = len(grid) * per_step  # streams 0 .. N * per_step - 1, each once, in order
    coeffs = _COEFFS[predictor](grid) if predictor != "none" else None
    x = x_T
    for i in run.steps(len(grid), desc=name):
        x0 = None
        if coeffs is not None:
            x, x0 = _predict(run, grid, x, i, coeffs[i], i * per_step)
        for j in range(n_corr):
            x, x0 = _correct(run, grid, x, i, corrector, snr, i * per_step + first + j)
        run.report(i, grid.tl[i + 1], x, x0)
    return _finish(run, grid, x, opts["denoise_final"])


# ---------------------------------------------------------------------------------------------
# Public samplers
# ---------------------------------------------------------------------------------------------
def ancestral(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) written through the exact forward kernel.

    ``x_s ~ q(x_s | x_t, x0_hat)``, ``x0_hat = (x_t - std_t eps) / alpha_t``: the Gaussian posterior
    of ``x_s ~ N(alpha_s x0, std_s^2)``, ``x_t | x_s ~ N(r x_s, q^2)``, with mean
    ``(alpha_s q^2 x0_hat + r std_s^2 x_t) / std_t^2`` and std ``std_s q / std_t``. For VP with
    DDPM's grid this is DDPM's step; for VE (``r = 1``) it is SMLD's ancestral step
    ``x_s = x_t + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2) z``.

    ``x0_hat`` is not clipped (DDPM clips it to [-1, 1] for images; clip in the model if wanted).
    The plug-in ``x0_hat`` ignores the posterior spread of ``x0``, so the law is too narrow at few
    steps (for ``N(mu, s^2)`` data at 100 steps about -12% in variance on VP, -8% on VE; O(1/N)).

    Knobs: ``schedule`` (a name in ``solvers.base.SCHEDULES``), ``t_min`` (default ``sde.t_min``),
    ``denoise_final``. One network evaluation per step.
    """
    opts = _options("ancestral", knobs)
    return _pc_loop("ancestral", model, sde, x_T, steps, generator, callback, progress, model_kwargs,
                    {**opts, "predictor": "ancestral"})


def euler_maruyama(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE ``dx = [f x - g^2 score] dt + g dW_bar`` (Song et al. 2021, eq. 6).

    ``x_s = x_t - h (f(t) x_t - g(t)^2 score(x_t, t)) + g(t) sqrt(h) z``, ``h = t - s``. Knobs as
    for :func:`ancestral`. One network evaluation per step.
    """
    opts = _options("euler_maruyama", knobs)
    return _pc_loop("euler_maruyama", model, sde, x_T, steps, generator, callback, progress, model_kwargs,
                    {**opts, "predictor": "euler_maruyama"})


def reverse_diffusion(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, eq. 46) from the exact forward discretisation.

    With ``(r, q) = sde.transition(s, t)`` the forward step is ``x_t = x_s + (r - 1) x_s + q z``,
    so the reverse step is ``x_s = (2 - r) x_t + q^2 score(x_t, t) + q z``. Knobs as for
    :func:`ancestral`. One network evaluation per step.
    """
    opts = _options("reverse_diffusion", knobs)
    return _pc_loop("reverse_diffusion", model, sde, x_T, steps, generator, callback, progress, model_kwargs,
                    {**opts, "predictor": "reverse_diffusion"})


def pc(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 3).

    Each step runs the predictor from ``t_i`` to ``t_{i+1}`` (``euler_maruyama``,
    ``reverse_diffusion``, ``ancestral`` or ``none``), then ``corrector_steps`` corrector steps at
    ``t_{i+1}`` (``langevin``: step ``e = 2 alpha_i (snr ||z|| / ||score||)^2``, norms per sample
    over all non-batch dims; ``ald``: ``e = 2 alpha_i (snr std)^2``; or ``none``), with
    ``alpha_i = r_i^2`` from ``transition`` (``1 - beta_i`` for VP-type SDEs, 1 for VE). This is the
    papers' order; score_sde_pytorch runs the corrector first at each time, which differs only by
    a corrector at ``T`` instead of one at ``t_min``. Defaults: reverse-diffusion + Langevin with
    ``snr = 0.16`` (the paper's setting for VE/CIFAR-10) and one corrector step, i.e. 2 NFE per step.

    Caveat, low dimension: the per-sample ``langevin`` step depends on the state,
    ``e ~ 1/||score(x)||^2``, and a Langevin chain with state-dependent step ``e(x)`` leaves
    ``p(x) / e(x)`` invariant, not ``p`` (Fokker-Planck with ``rho = p / e``). For Gaussian data,
    with ``||z||`` at its typical value, that is ``p ||x - mean||^2``: the radius law moves from
    chi^2_D to chi^2_{D+2}, a variance bias of order ``1/D`` whatever ``snr``. At stationarity with
    snr = 0.16 we measured about +30% at D = 16, +9% at D = 64 and +4% at D = 256 (ULA's own +2.6%
    included): negligible only for images. In 1-2 dimensions ``||score||`` is often near 0 and
    single steps explode. score_sde averages the norms over the batch, which hides this but ties
    each sample to its batch; use ``corrector="ald"`` (state-independent step) for low-dimensional data.
    """
    opts = _options("pc", knobs)
    return _pc_loop("pc", model, sde, x_T, steps, generator, callback, progress, model_kwargs, opts)


def langevin(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """Annealed Langevin dynamics over the time grid: the corrector alone (Song & Ermon 2019).

    At each ``t_1, ..., t_N`` run ``corrector_steps`` Langevin steps targeting ``p_t``;
    ``corrector="ald"`` (default) uses ``e = 2 alpha_i (snr std_t)^2``, ``corrector="langevin"`` the
    snr rule of :func:`pc`. ``steps * corrector_steps`` network evaluations (+1 to denoise).

    The defaults (snr 0.16, one step per level, as score_sde's Langevin-only setting) mix slowly:
    with ALD the step at low noise is tiny, so the law freezes where ``(snr std)^2 << data variance``.
    On ``N(mu, 0.5^2)`` data the exact chain law is ~25% too wide in variance even with 1000 levels
    (VP and VE); ``snr=0.5, corrector_steps=3`` is within ~4% at 150-200 levels (tested).
    """
    opts = _options("langevin", knobs)
    if opts["corrector"] == "none":
        raise ValueError("corrector must be 'langevin' or 'ald' for the langevin sampler; got 'none'")
    return _pc_loop("langevin", model, sde, x_T, steps, generator, callback, progress, model_kwargs,
                    {**opts, "predictor": "none"})


# ---------------------------------------------------------------------------------------------
# torchsde
# ---------------------------------------------------------------------------------------------
class _TorchsdeReverse(torch.nn.Module):
    """The reverse SDE in forward time ``tau = T - t`` on flat states ``(B, D)``, for torchsde.

    ``dy = -(f(t) y - g(t)^2 score(y, t)) dtau + g(t) dW_tau``: additive noise (``g`` is free of y).
    """

    noise_type = "additive"

    def __init__(self, run: Run, sde: SDE, shape: torch.Size, sde_type: str):
        super().__init__()
        self.run, self.sde_, self.shape, self.sde_type = run, sde, shape, sde_type
        # (y, tau, f(tau, y)) of the last drift evaluation, mutated in place: nn.Module's __setattr__
        # costs ~10 us a call, as much as a small tensor op, and f runs once per step
        self._memo: List[Any] = [None, None, None]
        #: tau -> (t, alpha, std, f, g): the grid's times precomputed, others (sub-steps, SRK stages) added as asked
        self._coeff_at: Dict[float, Tuple[float, float, float, float, float]] = {}
        self._t_batch: Dict[float, Tensor] = {}
        self.last_denoised: Optional[Tensor] = None

    def precompute(self, taus: Sequence[float]) -> None:
        """Coefficients at the step times ``taus`` in one vectorised call each (asked for one time at
        a time they cost more host time per step than the rest of the step outside the network)."""
        t = (self.sde_.T - torch.tensor(list(taus), dtype=torch.float64)).clamp(0.0, self.sde_.T)
        with unchecked():
            a, s = self.sde_.alpha(t), self.sde_.std(t)
            f, g = self.sde_.sde(torch.ones(len(t), 1, dtype=torch.float64), t)
        for row in zip(taus, t.tolist(), a.tolist(), s.tolist(), f[:, 0].tolist(), g.tolist()):
            self._coeff_at[float(row[0])] = row[1:]
            self._t_batch[row[1]] = self.run.times(row[1])  # the model's (B,) time, built once

    def _coeffs(self, tau: Tensor) -> Tuple[float, float, float, float, float]:
        """``(t, alpha, std, f, g)`` at ``t = T - tau``: precomputed at the step times, added by
        :meth:`precompute` for any other time asked (sub-steps, SRK stages; torchsde asks for f and g
        at the same times, and its contract check asks again; a few floats per distinct time)."""
        key = float(tau)
        hit = self._coeff_at.get(key)
        if hit is None:
            self.precompute([key])
            hit = self._coeff_at[key]
        return hit

    def f(self, tau: Tensor, y: Tensor) -> Tensor:
        # torchsde's contract check evaluates f at the start point once more: reuse that evaluation.
        memo = self._memo
        if memo[0] is y and memo[1] == tau:
            return memo[2]
        t, a, s, f, g = self._coeffs(tau)
        x = y.reshape(self.shape)
        tb = self._t_batch.get(t)
        eps = self.run.eps(x, t if tb is None else tb)
        if self.run.callback is not None:  # Tweedie's estimate, only when someone reads it
            self.last_denoised = _tweedie(x, eps, a, s)
        # -(f x - g^2 score) = -(g^2 / s) eps - f x with score = -eps / std, written into eps's shape
        # and read back flat (eps is the model's; a fresh tensor from the first op, then in place)
        drift = torch.mul(x, -f).add_(eps, alpha=-(g * g / s))
        out = drift.reshape(y.shape)
        memo[:] = (y, tau, out)
        return out

    def g_prod(self, tau: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self._coeffs(tau)[4] * v

    def f_and_g_prod(self, tau: Tensor, y: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """What torchsde's Euler-type steps ask for; defining it skips torchsde's default wrapper."""
        return self.f(tau, y), self.g_prod(tau, y, v)


class _SampleBrownian:
    """Brownian increments on a fixed step grid drawn per sample from ``Run.noise``.

    Answers torchsde's queries ``W(tb) - W(ta)`` (and the space-time Levy area ``U`` that SRK
    asks for: ``U = h (W / 2 + H)``, ``H ~ N(0, h / 12)`` independent of ``W``) for the cells
    ``[tau0 + j h, tau0 + (j + 1) h]`` of one report interval. Only fixed steps are supported:
    an adaptive solver's sub-cell queries would need a Brownian bridge keyed per sample.
    """

    def __init__(self, run: Run, like: Tensor, tau0: float, tau1: float, n_sub: int, stream0: int):
        self.run, self.like = run, like
        self.tau0, self.tau1, self.n_sub, self.h = tau0, tau1, n_sub, (tau1 - tau0) / n_sub
        self.stream0 = stream0
        self._cache: Dict[int, Tuple[Tensor, Tensor]] = {}

    # torchsde reads these attributes
    shape = property(lambda self: tuple(self.like.shape))
    dtype = property(lambda self: self.like.dtype)
    device = property(lambda self: self.like.device)
    levy_area_approximation = "space-time"

    def size(self):
        return self.shape

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_A:
            raise ValueError("per-sample Brownian motion answers increments (and space-time Levy area) only")
        ta, tb = float(ta), float(tb)
        j = int(round((ta - self.tau0) / self.h))
        end = self.tau1 if j == self.n_sub - 1 else self.tau0 + (j + 1) * self.h
        if not (0 <= j < self.n_sub) or abs(ta - (self.tau0 + j * self.h)) > 1e-9 or abs(tb - end) > 1e-9:
            raise ValueError(
                f"Brownian query [{ta}, {tb}] is not a cell of the fixed step grid; "
                "use brownian='interval' for adaptive stepping"
            )
        h = tb - ta
        if j not in self._cache:  # W = sqrt(h) z, scaled in place (Run.noise hands out a fresh tensor)
            w = self.run.noise(self.like, self.stream0 + j).mul_(math.sqrt(h))
            z_h = self.run.noise(self.like, _LEVY_STREAMS + self.stream0 + j) if return_U else None
            self._cache[j] = (w, z_h)
        w, z_h = self._cache[j]
        if not return_U:
            return w
        if z_h is None:
            z_h = self.run.noise(self.like, _LEVY_STREAMS + self.stream0 + j)
            self._cache[j] = (w, z_h)
        return w, h * (0.5 * w + math.sqrt(h / 12.0) * z_h)


#: torchsde methods whose step only adds, subtracts and multiplies by the time (srk and milstein call
#: ``dt.sqrt()``, so they get 0-d tensors as torchsde's own loop gives them).
_FLOAT_TIME_METHODS = frozenset({"euler", "heun", "euler_heun", "midpoint"})

_ENTROPY_STREAM = 0x7FFF0000  # far above the streams the step loop uses
# Levy-area noise (SRK) of the W cell with stream k is stream _LEVY_STREAMS + k, so the W streams run
# 0, 1, 2, ... in order and Run.noise can draw them ahead in blocks.
_LEVY_STREAMS = 0x40000000


def _seed_entropy(run: Run, like: Tensor) -> int:
    """A 63-bit entropy for torchsde's BrownianInterval, derived from the run's noise (reproducible)."""
    z = run.noise(torch.zeros(like.shape[0], 4, dtype=torch.float64), _ENTROPY_STREAM)
    return int.from_bytes(hashlib.sha256(z.numpy().tobytes()).digest()[:8], "little") >> 1


def sde(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    generator: Any = None,
    callback: Any = None,
    progress: bool = False,
    model_kwargs: Optional[dict] = None,
    **knobs: Any,
) -> Tensor:
    """The reverse SDE integrated by ``torchsde.sdeint`` in forward time ``tau = T - t``.

    ``dy = -(f y - g^2 score) dtau + g dW`` on flat states ``(B, D)`` (reshaped back to any rank).
    ``steps`` report intervals follow ``schedule``; inside each, the solver takes fixed steps of at
    most ``dt`` (default: one step per interval) or, with ``adaptive=True``, error-controlled steps
    (``rtol``, ``atol``, ``dt_min``). ``method`` is a torchsde method name in
    :data:`TORCHSDE_METHODS` (Stratonovich methods are exact reinterpretations: the noise is additive).

    ``brownian="sample"`` (default) builds the Brownian increments per sample from ``Run.noise``,
    so sample i is the same in any batch; it supports fixed steps only. ``brownian="interval"`` uses
    torchsde's ``BrownianInterval`` seeded from the generator: reproducible for a given seed and
    batch, and it supports adaptive steps, but torchsde draws the whole ``(B, D)`` block at once, so
    sample i then depends on the batch size.
    """
    import torchsde

    opts = _options("sde", knobs)
    method, brownian = opts["method"], opts["brownian"]
    if method not in TORCHSDE_METHODS:
        raise ValueError(f"method must be one of {sorted(TORCHSDE_METHODS)}; got {method!r}")
    if brownian not in ("sample", "interval"):
        raise ValueError(f"brownian must be 'sample' or 'interval'; got {brownian!r}")
    adaptive = bool(opts["adaptive"])
    if adaptive and brownian == "sample":
        raise ValueError("adaptive=True needs brownian='interval' (per-sample increments exist on a fixed grid only)")
    dt = opts["dt"]
    if dt is not None and not float(dt) > 0:
        raise ValueError(f"dt must be positive; got {dt!r}")

    run = Run(model, sde, x_T, generator, callback, progress, model_kwargs or {})
    grid = _Grid(sde, steps, opts["schedule"], opts["t_min"])
    taus = [sde.T - float(t) for t in grid.t]
    shape = x_T.shape
    y = x_T.reshape(shape[0], -1)
    rsde = _TorchsdeReverse(run, sde, shape, TORCHSDE_METHODS[method])
    rsde.precompute(taus)
    levy = {"srk": "space-time"}.get(method, "none")
    bm_all = None
    if brownian == "interval":
        bm_all = torchsde.BrownianInterval(
            t0=taus[0], t1=taus[-1], size=tuple(y.shape), dtype=y.dtype, device=y.device,
            entropy=_seed_entropy(run, y), levy_area_approximation=levy,
        )
    stepper = _TorchsdeStepper(rsde, method, adaptive, opts["rtol"], opts["atol"], opts["dt_min"])
    extra = None
    stream = 0
    n_subs = [1 if dt is None else max(1, math.ceil((taus[k + 1] - taus[k]) / float(dt) - 1e-9))
              for k in range(len(grid))]
    if bm_all is None:
        run.streams = sum(n_subs)  # W cells draw streams 0, 1, 2, ... in order
    t_next = grid.t[1:].tolist()
    for k in run.steps(len(grid), desc="sde"):
        tau0, tau1, n_sub = taus[k], taus[k + 1], n_subs[k]
        h = (tau1 - tau0) / n_sub
        if bm_all is None:
            bm = _SampleBrownian(run, y, tau0, tau1, n_sub, stream)
            stream += n_sub
        else:
            bm = bm_all
        y, extra = stepper(
            y, tau0, tau1, bm,
            h * (1 + 1e-10),  # the solver clips its last step at tau1: no sliver step from rounding
            extra,
        )
        # the state is finite whatever its shape: reshape only for a callback
        run.report(k, t_next[k], y.reshape(shape) if run.callback is not None else y, _reshape(rsde.last_denoised, shape))
    return _finish(run, grid, y.reshape(shape), opts["denoise_final"])


class _TorchsdeStepper:
    """``torchsde.sdeint`` over one report interval at a time, paying its set-up once; returns the
    state at the interval's end and the solver's extra state.

    Every ``sdeint`` call re-runs ``check_contract`` (shape checks that evaluate the drift and
    diffusion and draw a full-size ``torch.randn``) and builds a solver: ~1.6 ms per interval at
    64 x 768, more than the rest of a step. The sampler reports after every interval (NaN guard,
    callbacks), so it calls the solver once per interval; this runs ``check_contract`` and builds
    the solver on the first call exactly as ``sdeint`` does, then swaps in each interval's Brownian
    motion and step size and runs the solver's steps (adaptive: ``solver.integrate``, what ``sdeint``
    does after its checks; fixed: ``integrate``'s step loop, see below), so the numbers are identical
    (tested). If torchsde's internals move, it falls back to ``sdeint``.
    """

    def __init__(self, rsde: Any, method: str, adaptive: bool, rtol: float, atol: float, dt_min: float):
        self.rsde, self.method, self.adaptive = rsde, method, adaptive
        self.rtol, self.atol, self.dt_min = rtol, atol, dt_min
        self.solver: Any = None
        self.fast = True

    def _sdeint(self, y: Tensor, ts: Tensor, bm: Any, dt: float, extra: Any):
        import torchsde

        ys, extra = torchsde.sdeint(self.rsde, y, ts, bm=bm, method=self.method, dt=dt, adaptive=self.adaptive,
                                    rtol=self.rtol, atol=self.atol, dt_min=self.dt_min, extra=True,
                                    extra_solver_state=extra)
        return ys[-1], extra

    def __call__(self, y: Tensor, tau0: float, tau1: float, bm: Any, dt: float, extra: Any):
        ts = None
        if not (self.fast and self.solver is not None and not self.adaptive and self.method in _FLOAT_TIME_METHODS):
            ts = torch.tensor([tau0, tau1], dtype=torch.float64)  # what torchsde's own loop is given
        if not self.fast:
            return self._sdeint(y, ts, bm, dt, extra)
        if self.solver is None:
            try:
                from torchsde._core import methods
                from torchsde._core.sdeint import check_contract

                sde_, y, ts, bm, method, options = check_contract(self.rsde, y, ts, bm, self.method, self.adaptive,
                                                                  None, None, False)
                self.solver = methods.select(method=method, sde_type=sde_.sde_type)(
                    sde=sde_, bm=bm, dt=dt, adaptive=self.adaptive, rtol=self.rtol, atol=self.atol,
                    dt_min=self.dt_min, options=options)
            except (ImportError, AttributeError, TypeError):  # another torchsde layout: the public route
                self.fast = False
                return self._sdeint(y, ts, bm, dt, extra)
        self.solver.bm, self.solver.dt = bm, dt
        if extra is None:
            extra = self.solver.init_extra_solver_state(ts[0], y)  # first call: ts was built
        if self.adaptive:
            ys, extra = self.solver.integrate(y, ts, extra)
            return ys[-1], extra
        # Fixed steps: the loop of ``integrate`` without its output interpolation, which at an output
        # time equal to the last step's end is ``0 * y_prev + 1 * y`` (three passes over the state)
        # followed by a stack of both states (a copy): the same numbers for finite states.
        if self.method in _FLOAT_TIME_METHODS:  # no tensor arithmetic on the time: Python floats, same numbers
            t, t_end = tau0, tau1
        else:  # srk and milstein call dt.sqrt(): 0-d float64 tensors, as in torchsde's own loop
            t, t_end = ts[0], ts[-1]
        while t < t_end:
            t_next = min(t + dt, t_end)
            y, extra = self.solver.step(t, t_next, y, extra)
            t = t_next
        return y, extra


def _reshape(v: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    return None if v is None else v.reshape(shape)


STOCHASTIC: Dict[str, Callable[..., Tensor]] = {
    "ancestral": ancestral,
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "pc": pc,
    "langevin": langevin,
    "sde": sde,
}
