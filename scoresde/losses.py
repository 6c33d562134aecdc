"""Training losses: denoising score matching in eps form over continuous time, and DDPM's discrete loss.

Continuous loss (Ho et al. 2020's ``L_simple`` in continuous time; Song et al. 2021, eq. 7, with the
score written as ``-eps/std``)::

    L = E_t  w(t)  E_{x0, eps} mean_dims || eps_theta(alpha(t) x0 + std(t) eps, t) - eps ||^2

with ``t`` drawn on ``[t_min, T]``. Its minimiser is ``eps_theta(x, t) = E[eps | x_t = x]``, the exact
``-std(t) grad log p_t(x)``.

Likelihood weighting (Song, Durkan, Murray & Ermon 2021, "Maximum likelihood training of score-based
diffusion models"): the score-matching weight ``g(t)^2`` becomes, in eps form,

    w(t) = g(t)^2 / std(t)^2 = -d lambda / dt,        lambda(t) = log(alpha^2 / std^2),

because ``g^2 = d std^2/dt - 2 f std^2`` and ``f = d log alpha / dt`` for every linear SDE (so no
per-SDE formula is needed). We normalise ``w`` to mean one under uniform ``t``: its integral is
``Z = lambda(t_min) - lambda(T)``, so ``w_bar = Z / (T - t_min)`` and the loss uses ``w / w_bar``.

Importance sampling: draw ``t`` from ``p(t) = w(t) / Z``. Its CDF is
``F(t) = (lambda(t_min) - lambda(t)) / Z``, inverted exactly with the SDE's ``t_from_log_snr``::

    t = t_from_log_snr(lambda(t_min) - u Z),    u ~ U[0, 1)

i.e. ``t`` uniform in log-SNR. Each draw carries the weight ``target(t) / ((T - t_min) p(t))`` that
keeps the estimator unbiased for the same objective: exactly 1 for the likelihood weighting (the
variance of ``w`` is removed), ``w_bar / w(t)`` for the unweighted ``L_simple``.

Training targets (``prediction``), each wrapped back to the eps contract at load by
:func:`scoresde.adapters.as_eps_model`, so samplers and the likelihood never see the difference:

- ``eps``: the loss above;
- ``x0``: ``w(t) min(SNR, 5) mean_dims || x0_theta(x_t, t) - x0 ||^2``, ``SNR = alpha^2 / std^2``: the
  network predicts the data, with the min-SNR-5 weighting of Hang et al. 2023 ("Efficient diffusion
  training via Min-SNR weighting strategy"): the eps loss at high noise, a bounded weight at low noise
  (plain x0 MSE underweights low noise by ``1/SNR`` relative to eps, Salimans & Ho's ``max(SNR, 1)``
  weights it without bound);
- ``v``: ``w(t) mean_dims || v_theta(x_t, t) - v ||^2`` with ``v = alpha eps - std x0`` (Salimans & Ho
  2022, "Progressive distillation"), bounded at both ends of the noise range;
- ``edm``: EDM preconditioning (Karras et al. 2022, section 5 and Table 1): with ``y = x_t / alpha =
  x0 + sigma eps``, ``D = c_skip y + c_out F_theta(c_in y, t)`` and the loss
  ``lambda(sigma) ||D - x0||^2`` with ``lambda = 1 / c_out^2``, i.e. the unit-weighted
  ``|| F_theta - (x0 - c_skip y) / c_out ||^2`` (:func:`scoresde.adapters.edm_scalings`). The noise level is
  log-normal, ``ln sigma ~ N(P_mean, P_std^2)`` (-1.2, 1.2), mapped to ``t = t_from_sigma(sigma)`` and
  clamped to ``[t_min, T]``; ``weighting`` and ``importance_sampling`` do not apply.

The discrete DDPM loss (Ho et al. 2020, Algorithm 1) draws integer steps ``i ~ U{0..N-1}`` with
``abar_i = alpha(t_i)^2`` at ``t_i = (i + 1) T / N`` (see :mod:`scoresde.ddpm`), and calls the network at
the continuous time ``t_i``: the same network serves both losses and every continuous-time sampler.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ._tensor import append_dims
from .adapters import EDMPreconditioner
from .ddpm import alphas_cumprod as _alphas_cumprod
from .ddpm import ddpm_betas_from_sde, ddpm_times
from .sde import SDE

EpsModel = Callable[..., torch.Tensor]

#: names of the time weightings of the continuous loss
WEIGHTINGS = ("none", "likelihood")

#: what a trained network predicts (see the module docstring)
TRAIN_PREDICTIONS = ("eps", "x0", "v", "edm")


def likelihood_weight(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """``w(t) = g(t)^2 / std(t)^2 = -d lambda/dt``: Song et al. 2021's ``g^2`` weighting in eps form, ``(B,)``."""
    _, g = sde.sde(t.new_zeros(t.shape + (1,)), t)  # diffusion g(t), (B,)
    return g * g / sde.std(t) ** 2


class DenoisingLoss:
    """Denoising score matching in eps form over ``t in [t_min, T]`` (see the module docstring).

    Args:
        sde: the forward SDE.
        weighting: ``"none"`` (L_simple) or ``"likelihood"`` (``w = g^2/std^2``, normalised to mean 1).
        importance_sampling: draw ``t`` with density proportional to the likelihood weight
            (uniform in log-SNR) and reweight so the objective is unchanged.
        t_min: lower time limit (default ``sde.t_min``).
        prediction: the training target, ``"eps"``, ``"x0"``, ``"v"`` or ``"edm"``.
        sigma_data: EDM's data standard deviation (``prediction="edm"`` only).
        P_mean, P_std: EDM's log-normal noise distribution ``ln sigma ~ N(P_mean, P_std^2)``.

    ``sample_t`` draws times and their weights, ``per_sample`` evaluates the loss for given ``t`` and
    noise (so a distributed trainer can draw for the global batch and slice), and calling the object
    does both and returns the batch mean.
    """

    def __init__(self, sde: SDE, weighting: str = "none", importance_sampling: bool = False, t_min: Optional[float] = None,
                 prediction: str = "eps", sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
        self.check_target(prediction, sigma_data, weighting, importance_sampling)
        if not (P_std > 0 and math.isfinite(P_std) and math.isfinite(P_mean)):
            raise ValueError(f"P_mean must be finite and P_std positive; got {P_mean!r}, {P_std!r}")
        self.prediction, self.sigma_data, self.P_mean, self.P_std = prediction, float(sigma_data), float(P_mean), float(P_std)
        self.sde, self.weighting, self.importance_sampling = sde, weighting, bool(importance_sampling)
        self.t_min = float(sde.t_min if t_min is None else t_min)
        if not 0 < self.t_min < sde.T:
            raise ValueError(f"t_min must lie in (0, T={sde.T}); got {self.t_min}")
        ends = sde.log_snr(torch.tensor([self.t_min, sde.T], dtype=torch.float64))
        self._lam_min_t, self._lam_T = float(ends[0]), float(ends[1])  # lambda(t_min) > lambda(T)
        #: integral of w over [t_min, T]
        self.weight_integral = self._lam_min_t - self._lam_T
        #: mean of w under uniform t
        self.weight_mean = self.weight_integral / (sde.T - self.t_min)

    @staticmethod
    def check_target(prediction: str, sigma_data: float = 0.5, weighting: str = "none", importance_sampling: bool = False) -> None:
        """Raise ``ValueError`` for an unknown ``prediction``, a bad ``sigma_data``, or EDM combined with a
        time weighting or importance sampling (EDM brings its own)."""
        if prediction not in TRAIN_PREDICTIONS:
            raise ValueError(f"prediction must be one of {TRAIN_PREDICTIONS}; got {prediction!r}")
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a positive finite number; got {sigma_data!r}")
        if prediction == "edm" and (weighting != "none" or importance_sampling):
            raise ValueError("prediction='edm' brings its own noise distribution and weighting; "
                             "use weighting='none' and importance_sampling=False")

    def sample_t(
        self, n: int, *, generator: Optional[torch.Generator] = None, device: Optional[torch.device | str] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` times and per-sample loss weights: ``(t (n,), weight (n,))``, float32."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device if generator is not None else None)
        if self.prediction == "edm":
            # ln sigma = P_mean + P_std z with z = Phi^-1(u), so one uniform draw per sample as for the others
            z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-12, 1 - 1e-12) - 1.0)
            sigma = torch.exp(self.P_mean + self.P_std * z)
            t = self.sde.t_from_sigma(sigma).clamp(self.t_min, self.sde.T)
            weight = torch.ones_like(t)
        elif self.importance_sampling:
            lam = self._lam_min_t - u * self.weight_integral
            t = self.sde.t_from_log_snr(lam).clamp(self.t_min, self.sde.T)
            # p(t) (T - t_min) = w(t) / w_bar, so weight = target(t) * w_bar / w(t)
            weight = torch.ones_like(t) if self.weighting == "likelihood" else self.weight_mean / likelihood_weight(self.sde, t)
        else:
            t = self.t_min + (self.sde.T - self.t_min) * u
            weight = likelihood_weight(self.sde, t) / self.weight_mean if self.weighting == "likelihood" else torch.ones_like(t)
        return t.float().to(device), weight.float().to(device)

    def per_sample(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """``weight * mean_dims (out_theta - target)^2`` for given ``t (B,)`` and ``eps`` like ``x0``: ``(B,)``.

        ``model`` is the raw network; the target is ``eps``, ``x0``, ``v`` or EDM's ``(x0 - c_skip y) / c_out``
        as ``prediction`` says."""
        if eps.shape != x0.shape:
            raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}; got {tuple(eps.shape)}")
        if t.shape != x0.shape[:1]:
            raise ValueError(f"t must have shape ({x0.shape[0]},); got {tuple(t.shape)}")
        a, s = append_dims(self.sde.alpha(t), x0.ndim), append_dims(self.sde.std(t), x0.ndim)
        x_t = a * x0 + s * eps
        if self.prediction == "edm":
            pred, target = EDMPreconditioner(model, self.sde, self.sigma_data).raw(x_t, t, x0, **(model_kwargs or {}))
        else:
            pred = model(x_t, t, **(model_kwargs or {}))
            target = eps if self.prediction == "eps" else x0 if self.prediction == "x0" else a * eps - s * x0
        err = (pred.float() - target.float()).pow(2).reshape(x0.shape[0], -1).mean(dim=1)
        if self.prediction == "x0":  # min-SNR-5 weighting min(alpha^2 / std^2, 5)
            err = err * (self.sde.alpha(t) / self.sde.std(t)).pow(2).clamp(max=5.0).to(err)
        return err if weight is None else err * weight

    def __call__(
        self,
        model: EpsModel,
        x0: torch.Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """Monte-Carlo estimate of the loss on a batch ``x0 (B, ...)``: a scalar."""
        t, w = self.sample_t(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.per_sample(model, x0, t.to(x0.dtype), eps, w, model_kwargs).mean()


def dsm_loss(
    model: EpsModel,
    sde: SDE,
    x0: torch.Tensor,
    *,
    weighting: str = "none",
    importance_sampling: bool = False,
    t_min: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    prediction: str = "eps",
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """One-call form of :class:`DenoisingLoss`: the batch-mean denoising score-matching loss."""
    return DenoisingLoss(sde, weighting, importance_sampling, t_min, prediction, sigma_data)(
        model, x0, generator=generator, model_kwargs=model_kwargs)


def ddpm_loss(
    model: EpsModel,
    sde: SDE,
    x0: torch.Tensor,
    *,
    num_steps: int = 1000,
    alphas_cumprod: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    eps: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
) -> torch.Tensor:
    """DDPM's discrete ``L_simple`` (Ho et al. 2020, Algorithm 1), per sample ``(B,)``.

    ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps`` with ``i ~ U{0..N-1}`` (or the given integer
    ``timesteps``); the network is called at the continuous time whose ``alpha(t)^2 = abar_i``. By
    default ``abar`` is the SDE discretised on ``t_i = (i + 1) T / N`` (:func:`scoresde.ddpm.ddpm_betas_from_sde`),
    so that time is exactly ``t_i``; a given ``alphas_cumprod`` is mapped with ``t_from_log_snr``
    (clamped to ``[0, T]``).
    """
    b = x0.shape[0]
    if alphas_cumprod is None:
        abar = _alphas_cumprod(ddpm_betas_from_sde(sde, num_steps))
        times = ddpm_times(num_steps, sde.T)
    else:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.ndim != 1 or bool(torch.any(abar <= 0)) or bool(torch.any(abar >= 1)):
            raise ValueError("alphas_cumprod must be a 1-D tensor with entries in (0, 1)")
        num_steps = abar.numel()
        # a schedule that ends beyond the SDE's horizon is clamped to T (alpha(T)^2 ~ abar_{N-1})
        times = sde.t_from_log_snr(torch.log(abar) - torch.log1p(-abar)).clamp(0.0, sde.T)
    if timesteps is None:
        dev = generator.device if generator is not None else None
        timesteps = torch.randint(0, num_steps, (b,), generator=generator, device=dev)
    timesteps = torch.as_tensor(timesteps).long().cpu()
    if timesteps.shape != (b,) or bool(torch.any(timesteps < 0)) or bool(torch.any(timesteps >= num_steps)):
        raise ValueError(f"timesteps must be {b} integers in [0, {num_steps}); got shape {tuple(timesteps.shape)}")
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    a = append_dims(abar[timesteps].sqrt().to(x0), x0.ndim)
    s = append_dims((1 - abar[timesteps]).sqrt().to(x0), x0.ndim)
    t = times[timesteps].to(device=x0.device, dtype=x0.dtype)
    pred = model(a * x0 + s * eps, t, **(model_kwargs or {}))
    return (pred.float() - eps.float()).pow(2).reshape(b, -1).mean(dim=1)


__all__ = ["WEIGHTINGS", "TRAIN_PREDICTIONS", "DenoisingLoss", "dsm_loss", "ddpm_loss", "likelihood_weight"]
