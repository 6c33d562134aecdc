"""Sampling ``p(x0 | y)`` with a model of ``p(x0)`` only, for ``y = A x0 + sigma_y n``.

Every method uses the unconditional ``model(x, t) -> eps`` and one :class:`Observation`:

- :class:`ReplacementHook` — Song et al. 2021 (score SDE, app. I) imputation: after every sampler
  step the observed part of the state is replaced by a fresh forward-noised copy of ``y``:
  ``x <- (I - A^+ A) x + A^+ (alpha_t y + std_t A z)`` (for a mask: ``mask (alpha_t y + std_t z) +
  (1 - mask) x``). A sampler *state hook*: works with every fixed-step sampler, adds no network
  evaluations. Noise-free ``y`` only.
- :func:`repaint` — Lugmayr et al. 2022 (RePaint): the same replacement inside an ancestral sampler
  that, every ``jump_length`` steps, jumps back up ``jump_length`` levels with the exact forward
  kernel (``sde.transition``) and redoes them, ``resamplings`` times. NFE = ``steps + (resamplings - 1)
  * jump_length * floor((steps - 1) / jump_length) + 1``. Noise-free ``y`` only.
- :class:`DPSGuidance` — Chung et al. 2023 (DPS): a model wrapper adding the gradient of the
  Gaussian log-likelihood at the Tweedie estimate, ``grad_x log N(y; A x0_hat(x), sigma_y^2 I)``.
  Same NFE as the sampler, each with a backward pass. Needs ``sigma_y > 0``.
- :class:`PiGDMGuidance` — Song et al. 2023 (ΠGDM, "Pseudoinverse-guided diffusion models"): the
  same gradient with the covariance ``r_t^2 A A^T + sigma_y^2 I`` of ``A x0`` given ``x_t`` (exact for
  a Gaussian prior), ``r_t^2 = v std^2 / (alpha^2 v + std^2)`` with ``v`` the data variance.
  Same NFE as the sampler, each with a backward pass. Any ``sigma_y >= 0``.
- :func:`scoresde.conditioning.smc.smc_sample` — a particle filter (see that module).
- ``pigdm_2m`` — the ΠGDM wrapper driven by :func:`sde_dpmpp_2m`, a second-order stochastic
  multistep sampler (SDE-DPM-Solver++(2M), Lu et al. 2022) on a log-SNR grid: the same guidance,
  a sampler whose discretisation error falls as ``h^2`` instead of ``h``. Same NFE as ``pigdm``.

:func:`conditional_sample` runs any of them by name (:data:`METHODS` lists them with their costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .._tensor import append_dims, unchecked
from ..noise import SampleNoise, as_sample_noise
from ..parameterization import eps_to_x0
from ..sde import SDE
from .operators import LinearOperator

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# the observation
# ---------------------------------------------------------------------------------------------
class Observation:
    """``y = A x0 + sigma_y n``: an operator, the observed ``y`` and the noise level.

    Args:
        operator: a :class:`LinearOperator` acting on the data's event shape.
        y: shape ``operator.out_shape`` (one observation for the whole batch) or
            ``(B, *out_shape)`` (one per sample).
        sigma_y: noise standard deviation ``>= 0``.
    """

    def __init__(self, operator: LinearOperator, y: Tensor, sigma_y: float = 0.0):
        if not isinstance(operator, LinearOperator):
            raise ValueError(f"operator must be a LinearOperator; got {type(operator).__name__}")
        sigma_y = float(sigma_y)
        if not sigma_y >= 0 or sigma_y == float("inf"):
            raise ValueError(f"sigma_y must be a finite number >= 0; got {sigma_y}")
        self.operator, self.sigma_y = operator, sigma_y
        self.y = operator.check_y(torch.as_tensor(y))

    def y_like(self, x: Tensor) -> Tensor:
        """``y`` in ``x``'s dtype and device, broadcasting over the batch of ``x``."""
        y = self.y.to(device=x.device, dtype=x.dtype)
        if y.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"y holds {y.shape[0]} observations but the batch has {x.shape[0]} samples")
        return y

    def check_x(self, x: Tensor) -> None:
        self.operator.check_x(x)

    @property
    def event_shape(self):
        return tuple(self.operator.in_shape)

    def __repr__(self) -> str:
        return f"Observation({self.operator!r}, y={tuple(self.y.shape)}, sigma_y={self.sigma_y})"


def _noise_free(obs: Observation, method: str) -> None:
    if obs.sigma_y > 0:
        raise ValueError(f"method {method!r} conditions on noise-free observations only (sigma_y = 0); "
                         f"got sigma_y = {obs.sigma_y:g}: use dps, pigdm or smc for noisy y")


def _coef(sde: SDE, t: float, like: Tensor):
    tt = torch.tensor(float(t), dtype=torch.float64)
    return float(sde.alpha(tt)), float(sde.std(tt))


def _times(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


# ---------------------------------------------------------------------------------------------
# replacement (Song et al. 2021) as a state hook
# ---------------------------------------------------------------------------------------------
def replace_known(obs: Observation, sde: SDE, x: Tensor, t: float, z: Tensor) -> Tensor:
    """``x - A^+ A x + A^+ (alpha_t y + std_t A z)``: the observed part of ``x`` set to a sample of
    ``A x_t | x0 ~ N(alpha_t y, std_t^2 A A^T)``; the rest of ``x`` untouched."""
    op = obs.operator
    a, s = _coef(sde, t, x)
    known = a * obs.y_like(x) + s * op.forward(z)
    return x - op.project(x) + op.pinv(known.expand(x.shape[0], *known.shape[1:]))


class ReplacementHook:
    """Song et al. 2021 imputation as a sampler state hook: ``hook(step) -> new state``.

    After each step reaching time ``t`` the observed part is replaced by ``alpha_t y + std_t A z``
    with fresh per-sample noise ``z = step.noise(0)`` (at ``t = 0``, after a final denoising
    step, by ``y`` itself). Costs no network evaluation.
    """

    def __init__(self, obs: Observation):
        _noise_free(obs, "replacement")
        self.obs = obs

    def __call__(self, step: Any) -> Tensor:
        return replace_known(self.obs, step.sde, step.x, float(step.t), step.noise(0))


# ---------------------------------------------------------------------------------------------
# a small ancestral loop (used by RePaint, by the particle filter, and to run hooks when the
# installed solvers do not take a state hook)
# ---------------------------------------------------------------------------------------------
def ancestral_moments(sde: SDE, x: Tensor, x0: Tensor, t: float, s: float):
    """The DDPM posterior ``q(x_s | x_t, x0) = N(mean, var I)`` of any linear SDE, ``s < t``.

    With ``x_t | x_s ~ N(r x_s, q^2 I)`` (``sde.transition``) and ``x_s | x0 ~ N(alpha_s x0, std_s^2 I)``:
    ``mean = (q^2 alpha_s x0 + r std_s^2 x_t) / std_t^2``, ``var = std_s^2 q^2 / std_t^2``.
    Returns ``(mean, var)`` with ``var`` a float.
    """
    ts, tt = torch.tensor(float(s), dtype=torch.float64), torch.tensor(float(t), dtype=torch.float64)
    r, q = sde.transition(ts, tt)
    r, q2 = float(r), float(q) ** 2
    a_s, std_s = float(sde.alpha(ts)), float(sde.std(ts))
    std_t2 = float(sde.std(tt)) ** 2
    mean = (q2 * a_s * x0 + r * std_s**2 * x) / std_t2
    return mean, std_s**2 * q2 / std_t2


def sde_dpmpp_2m(
    model: Callable[..., Tensor],
    sde: SDE,
    x_T: Tensor,
    *,
    steps: int,
    noise: SampleNoise,
    schedule: str = "logsnr",
    t_min: Optional[float] = None,
    order: int = 2,
    denoise_final: bool = True,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", the stochastic multistep variant): a
    second-order stochastic sampler of the reverse SDE that needs one evaluation per step; the
    registered sampler ``solvers.SAMPLERS["dpmpp_2m_sde"]`` with this module's argument names.

    With ``lambda = log(alpha / std)``, ``h_i = lambda(t_{i+1}) - lambda(t_i)`` and the Tweedie estimate
    ``x0_i`` of ``model`` at ``(x_i, t_i)``::

        x_{i+1} = (std_{i+1} / std_i) e^{-h_i} x_i + alpha_{i+1} (1 - e^{-2 h_i}) D_i
                  + std_{i+1} sqrt(1 - e^{-2 h_i}) z_i,
        D_i = x0_i + (x0_i - x0_{i-1}) / (2 r_i),   r_i = h_{i-1} / h_i   (D_0 = x0_0).

    With ``D_i = x0_i`` (``order=1``) this is exactly the DDPM ancestral step
    (:func:`ancestral_moments`); the multistep correction extrapolates ``x0`` linearly in ``lambda``
    (no extra evaluation), which makes the step second order in ``h``.

    Args:
        model: ``model(x, t) -> eps`` (a guidance wrapper, or any eps model).
        sde: the SDE (``alpha``, ``std``).
        x_T: the start, ``(B, ...)``.
        steps: steps on the grid; NFE = ``steps`` (+1 with ``denoise_final``).
        noise: per-sample noise; step ``i`` draws stream ``1 + i``.
        schedule: a name in ``solvers.SCHEDULES`` (default ``"logsnr"``, equal steps in ``lambda``).
        t_min: last time of the grid (default ``sde.t_min``).
        order: 1 (ancestral) or 2.
        denoise_final: end with Tweedie's ``x0`` at the last time (one more evaluation).

    Returns:
        the samples, shape of ``x_T``.
    """
    import solvers

    return solvers.SAMPLERS["dpmpp_2m_sde"](model, sde, x_T, steps=steps, generator=noise, schedule=schedule,
                                            t_min=t_min, order=order, denoise_final=denoise_final)


# ---------------------------------------------------------------------------------------------
# RePaint
# ---------------------------------------------------------------------------------------------
def repaint_schedule(steps: int, jump_length: int, resamplings: int) -> list:
    """Level indices visited by RePaint, starting at ``steps`` (time T) and ending at 0 (t_min).

    Going down one level is a reverse step; every ``jump_length`` levels (at levels
    ``0, j, 2j, ... < steps - j``) the walk goes back up ``jump_length`` levels, ``resamplings - 1`` times.
    """
    if steps < 1 or jump_length < 1 or resamplings < 1:
        raise ValueError(f"steps, jump_length and resamplings must be >= 1; got {steps}, {jump_length}, {resamplings}")
    jumps = {j: resamplings - 1 for j in range(0, max(steps - jump_length, 0), jump_length)}
    level, path = steps, [steps]
    while level >= 1:
        level -= 1
        path.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                path.append(level)
    return path


def repaint(
    model: Callable[..., Tensor],
    sde: SDE,
    obs: Observation,
    x_T: Tensor,
    *,
    steps: int = 100,
    jump_length: int = 10,
    resamplings: int = 10,
    generator: Any = None,
    denoise_final: bool = True,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022) on ``steps`` uniform levels from T to ``sde.t_min``.

    Down moves: ancestral step (one NFE) then replacement of the known part at the new level
    (:func:`replace_known`). Up moves: the exact forward kernel ``x_u = r x_l + q z``
    (``sde.transition``). NFE: the number of down moves (see :func:`repaint_schedule`), +1 with
    ``denoise_final`` (Tweedie at t_min, then ``y`` put in exactly). Noise-free ``y`` only.
    """
    _noise_free(obs, "repaint")
    obs.check_x(x_T)
    noise = as_sample_noise(generator, x_T.shape[0])
    levels = torch.linspace(sde.t_min, sde.T, steps + 1, dtype=torch.float64).tolist()  # levels[l], l = 0..steps
    path = repaint_schedule(steps, jump_length, resamplings)
    x = x_T
    for move, (l_from, l_to) in enumerate(zip(path[:-1], path[1:])):
        stream = 1 + 3 * move
        t, s = levels[l_from], levels[l_to]
        if l_to < l_from:
            eps = model(x, _times(t, x))
            x0 = eps_to_x0(x, eps, sde, _times(t, x))
            mean, var = ancestral_moments(sde, x, x0, t, s)
            x = mean + var**0.5 * noise.randn_like(x, stream)
            x = replace_known(obs, sde, x, s, noise.randn_like(x, stream + 1))
        else:
            r, q = sde.transition(torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
            x = float(r) * x + float(q) * noise.randn_like(x, stream + 2)
    if denoise_final:
        t = levels[0]
        x = eps_to_x0(x, model(x, _times(t, x)), sde, _times(t, x))
        x = replace_known(obs, sde, x, 0.0, torch.zeros_like(x))
    return x


def repaint_nfe(steps: int, jump_length: int, resamplings: int, denoise_final: bool = True) -> int:
    path = repaint_schedule(steps, jump_length, resamplings)
    return sum(1 for a, b in zip(path[:-1], path[1:]) if b < a) + int(denoise_final)


# ---------------------------------------------------------------------------------------------
# gradient guidance wrappers
# ---------------------------------------------------------------------------------------------
class _Guidance(nn.Module):
    """``eps' = eps - scale std(t) g`` with ``g = grad_x log p~(y | x_t)`` computed by autograd
    through the model's Tweedie estimate; the output is detached."""

    def __init__(self, model: Callable[..., Tensor], sde: SDE, obs: Observation, scale: float = 1.0,
                 jacobian: str = "autograd"):
        super().__init__()
        if jacobian not in ("autograd", "gaussian"):
            raise ValueError(f"jacobian must be 'autograd' or 'gaussian'; got {jacobian!r}")
        self.model, self.sde, self.obs, self.scale, self.jacobian = model, sde, obs, float(scale), jacobian

    def residual_weight(self, r: Tensor, t: Tensor, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``Gamma^{-1} r`` for the method's likelihood covariance ``Gamma``."""
        raise NotImplementedError

    #: ``"autograd"``: the exact vector-Jacobian product through the model; ``"gaussian"``: the
    #: Jacobian of an ``N(m, v I)`` prior, ``d x0_hat / d x = alpha v / (alpha^2 v + std^2) I`` (no
    #: backward pass; robust where a network's Jacobian is poor at high noise, where x0_hat divides by a
    #: small alpha)
    jacobian: str = "autograd"
    data_var: float = 1.0

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        op = self.obs.operator
        t = _times(t, x)
        if self.jacobian == "gaussian":
            with torch.no_grad():
                eps = self.model(x, t, **kwargs)
                x0 = eps_to_x0(x, eps, self.sde, t)
                v = op.adjoint(self.residual_weight(self.obs.y_like(x) - op.forward(x0), t, x))
                with unchecked():
                    a, s = append_dims(self.sde.alpha(t), x.ndim), append_dims(self.sde.std(t), x.ndim)
                g = a * self.data_var / (a * a * self.data_var + s * s) * v
                return eps - self.scale * s * g
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = self.model(xg, t, **kwargs)
            x0 = eps_to_x0(xg, eps, self.sde, t)
            r = self.obs.y_like(x) - op.forward(x0)
            v = op.adjoint(self.residual_weight(r.detach(), t, x)).detach()  # A^T Gamma^{-1} r
            (g,) = torch.autograd.grad((x0 * v).sum(), xg)  # (d x0 / d x)^T v, per sample
        with unchecked():
            std = append_dims(self.sde.std(t), x.ndim)
        return (eps - self.scale * std * g).detach()


class DPSGuidance(_Guidance):
    """DPS (Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse Problems").

    ``log p(y | x_t) ~ log N(y; A x0_hat(x_t), sigma_y^2 I)``; the wrapper returns
    ``eps - scale std(t) grad_x log p``, ``scale = 1`` being the plain Gaussian likelihood
    (Chung et al. tune a step size instead; ``scale`` plays that role). Needs ``sigma_y > 0``.
    NFE: that of the sampler; each evaluation adds one backward pass through the model.
    """

    def __init__(self, model, sde, obs, scale: float = 1.0, jacobian: str = "autograd"):
        if obs.sigma_y <= 0:
            raise ValueError("dps needs noisy observations (sigma_y > 0); for noise-free y use replacement, repaint, pigdm or smc")
        super().__init__(model, sde, obs, scale, jacobian)

    def residual_weight(self, r, t, x):
        return r / self.obs.sigma_y**2


class PiGDMGuidance(_Guidance):
    """ΠGDM (Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems").

    ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)`` gives ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)``
    with ``r_t^2 = v std^2 / (alpha^2 v + std^2)`` (``v = data_var``; exact for ``N(m, v I)`` data);
    the wrapper returns ``eps - scale std(t) (d x0_hat / d x)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)``.
    Any ``sigma_y >= 0``. NFE: that of the sampler; each evaluation adds one backward pass.
    """

    def __init__(self, model, sde, obs, scale: float = 1.0, data_var: float = 1.0, jacobian: str = "autograd"):
        super().__init__(model, sde, obs, scale, jacobian)
        if not data_var > 0:
            raise ValueError(f"data_var must be positive; got {data_var}")
        self.data_var = float(data_var)

    def residual_weight(self, r, t, x):
        with unchecked():
            a2, s2 = self.sde.alpha(t) ** 2, self.sde.std(t) ** 2
        r2 = self.data_var * s2 / (a2 * self.data_var + s2)
        return self.obs.operator.solve(r, r2, torch.full_like(r2, self.obs.sigma_y**2))


# ---------------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------------
#: method name -> (noisy y allowed, cost in network evaluations)
METHODS: Dict[str, Dict[str, Any]] = {
    "replacement": dict(noisy=False, cost="the sampler's NFE (state hook, no extra evaluations)"),
    "repaint": dict(noisy=False, cost="steps + (resamplings-1) * jump_length * floor((steps-1)/jump_length) + 1"),
    "dps": dict(noisy=True, cost="the sampler's NFE, each with a backward pass (needs sigma_y > 0)"),
    "pigdm": dict(noisy=True, cost="the sampler's NFE, each with a backward pass"),
    "pigdm_2m": dict(noisy=True, cost="steps + 1 (sde_dpmpp_2m, log-SNR grid), each with a backward pass"),
    "smc": dict(noisy=True, cost="(steps + 1) x particles per output sample"),
}


@dataclass
class ConditionalResult:
    """Samples ``x`` ``(B, ...)`` and the network evaluations spent per output sample (``nfe``;
    a batched call on the B samples counts once, a particle filter counts every particle)."""

    x: Tensor
    nfe: int


def conditional_sample(
    model: Callable[..., Tensor],
    sde: SDE,
    obs: Observation,
    num_samples: int,
    *,
    method: str = "pigdm",
    sampler: str = "ancestral",
    steps: int = 100,
    generator: Any = None,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    **knobs: Any,
) -> ConditionalResult:
    """Draw ``num_samples`` samples of ``p(x0 | y)`` with ``method`` (a key of :data:`METHODS`).

    ``sampler``/``steps`` pick the :mod:`solvers` sampler for replacement (when the sampler takes a
    state hook; otherwise the built-in ancestral loop), dps and pigdm; ``pigdm_2m`` runs
    :func:`sde_dpmpp_2m` for ``steps`` steps (NFE ``steps + 1``; knobs ``schedule``, ``t_min``,
    ``order``) and ignores ``sampler``. ``knobs``: ``scale`` for dps / pigdm / pigdm_2m (and
    ``data_var`` for pigdm / pigdm_2m), ``jump_length`` / ``resamplings`` for repaint, ``particles``
    for smc; the rest go to the sampler. ``generator``: seed or :class:`SampleNoise` (per sample).
    """
    import solvers

    from .smc import smc_sample

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if sampler not in solvers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(solvers.SAMPLERS)}")
    shape = (int(num_samples),) + obs.event_shape
    noise = as_sample_noise(generator, shape[0])
    if method == "smc":
        particles = int(knobs.pop("particles", 16))
        schedule = str(knobs.pop("schedule", "logsnr"))
        _no_knobs(method, knobs)
        x, nfe = smc_sample(model, sde, obs, shape[0], particles=particles, steps=steps, schedule=schedule,
                            generator=noise, dtype=dtype, device=device)
        return ConditionalResult(x, nfe)
    x_T = sde.prior_std * noise.randn(shape[1:], 0, dtype=dtype, device=device)
    counted = solvers.CountingModel(model)
    if method == "repaint":
        jl, rs = int(knobs.pop("jump_length", 10)), int(knobs.pop("resamplings", 10))
        _no_knobs(method, knobs)
        with torch.no_grad():
            x = repaint(counted, sde, obs, x_T, steps=steps, jump_length=jl, resamplings=rs, generator=noise)
        return ConditionalResult(x, counted.nfe)
    if method == "replacement":
        res = solvers.sample(counted, sde, x_T=x_T, sampler=sampler, steps=steps, generator=noise,
                             state_hook=ReplacementHook(obs), **knobs)
        # the output's observed part is y itself (a no-op where the sampler already applied the hook at t = 0)
        x = replace_known(obs, sde, res.x, 0.0, torch.zeros_like(res.x))
        return ConditionalResult(x, counted.nfe)
    scale = float(knobs.pop("scale", 1.0))
    jacobian = str(knobs.pop("jacobian", "autograd"))
    if method == "pigdm_2m":
        wrapper = PiGDMGuidance(model, sde, obs, scale=scale, data_var=float(knobs.pop("data_var", 1.0)), jacobian=jacobian)
        counted = solvers.CountingModel(wrapper)
        loop = dict(schedule=str(knobs.pop("schedule", "logsnr")), t_min=knobs.pop("t_min", None),
                    order=int(knobs.pop("order", 2)))
        _no_knobs(method, knobs)
        x = sde_dpmpp_2m(counted, sde, x_T, steps=steps, noise=noise, **loop).detach()
        if obs.sigma_y == 0:  # the posterior puts x's observed part at y exactly
            x = replace_known(obs, sde, x, 0.0, torch.zeros_like(x))
        return ConditionalResult(x, counted.nfe)
    if method == "dps":
        wrapper: nn.Module = DPSGuidance(model, sde, obs, scale=scale, jacobian=jacobian)
    else:
        wrapper = PiGDMGuidance(model, sde, obs, scale=scale, data_var=float(knobs.pop("data_var", 1.0)), jacobian=jacobian)
    res = solvers.sample(wrapper, sde, x_T=x_T, sampler=sampler, steps=steps, generator=noise, **knobs)
    return ConditionalResult(res.x, res.nfe)


def _no_knobs(method: str, knobs: Dict[str, Any]) -> None:
    if knobs:
        raise TypeError(f"method {method!r} got unknown option(s) {sorted(knobs)}")


__all__ = ["Observation", "ReplacementHook", "replace_known", "repaint", "repaint_schedule", "repaint_nfe",
           "DPSGuidance", "PiGDMGuidance", "METHODS", "conditional_sample", "ConditionalResult",
           "ancestral_moments", "sde_dpmpp_2m"]
