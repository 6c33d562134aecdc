"""Forward SDEs of score-based diffusion and the questions samplers ask them.

Every SDE here is linear in ``x`` (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR):

    dx = f(t) x dt + g(t) dW,        x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I),

with ``f = d log alpha / dt`` and ``g^2 = d std^2/dt - 2 f std^2``. Samplers never ask "which SDE
are you?": they ask for ``alpha``, ``std``, ``log_snr`` and its inverse, the drift and diffusion,
the exact Gaussian ``transition`` between two times, and the prior. Each ``t`` is a tensor of shape
``(B,)`` (a float or 0-d tensor is accepted too) in continuous time ``[0, T]``; per-sample scalars
broadcast over data of any rank ``(B, ...)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, Tuple

import torch

from ._tensor import TimeLike, append_dims, as_time, check_positive, check_time, sum_except_batch

ScoreFn = Callable[..., torch.Tensor]


class SDE(ABC):
    """A linear forward SDE ``dx = f(t) x dt + g(t) dW`` on ``[0, T]``.

    Subclasses implement the unchecked ``_log_alpha``, ``_std``, ``_f``, ``_g2`` and
    ``_t_from_log_snr``; the public methods validate ``t`` and broadcast.
    """

    T: float = 1.0
    #: usual lower integration limit: std(t_min) is the smallest noise level samplers reach
    t_min: float = 1e-3
    #: standard deviation of the Gaussian prior N(0, prior_std^2 I) at time T
    prior_std: float = 1.0

    # -- schedule, implemented by subclasses (t already a validated tensor) -------------------
    @abstractmethod
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _std(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _f(self, t: torch.Tensor) -> torch.Tensor:
        """Drift coefficient ``f(t) = d log alpha / dt``."""

    @abstractmethod
    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion ``g(t)^2``."""

    @abstractmethod
    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor: ...

    def _t(self, t: TimeLike, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = as_time(t, like)
        check_time(t, self.T)
        return t

    # -- schedule, public ---------------------------------------------------------------------
    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Signal scale ``alpha(t)`` in ``x_t = alpha(t) x_0 + std(t) eps``."""
        return torch.exp(self._log_alpha(self._t(t)))

    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        return self._log_alpha(self._t(t))

    def std(self, t: TimeLike) -> torch.Tensor:
        """Noise scale ``std(t)`` in ``x_t = alpha(t) x_0 + std(t) eps``."""
        return self._std(self._t(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise-to-signal ratio ``std/alpha`` (the EDM/k-diffusion sigma): ``x_t/alpha = x_0 + sigma eps``."""
        t = self._t(t)
        return self._std(t) * torch.exp(-self._log_alpha(t))

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """``lambda(t) = log(alpha^2 / std^2)``, strictly decreasing in t."""
        t = self._t(t)
        return 2.0 * (self._log_alpha(t) - torch.log(self._std(t)))

    def t_from_log_snr(self, lam: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`log_snr` (DPM-Solver and other exponential integrators need both)."""
        lam = as_time(lam)
        return self._t_from_log_snr(lam)

    def t_from_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""
        sigma = as_time(sigma)
        return self._t_from_log_snr(-2.0 * torch.log(sigma))

    def beta(self, t: TimeLike) -> torch.Tensor:
        """``-2 f(t)``: the beta(t) of VP-type SDEs (zero for VE)."""
        return -2.0 * self._f(self._t(t))

    # -- distributions ------------------------------------------------------------------------
    def marginal(self, x0: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Perturbation kernel ``p_t(x | x0) = N(mean, std^2 I)``: returns ``(mean (B, ...), std (B,))``."""
        t = self._t(t, x0)
        return append_dims(torch.exp(self._log_alpha(t)), x0.ndim) * x0, self._std(t)

    def transition(self, s: TimeLike, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact kernel between two times ``s < t``: ``x_t | x_s ~ N(ratio x_s, std^2 I)``.

        ``ratio = alpha_t / alpha_s`` and ``std^2 = std_t^2 - ratio^2 std_s^2``, computed as
        ``std_t^2 (1 - exp(lambda_t - lambda_s))`` to avoid cancellation. Returns ``(ratio, std)``.
        """
        s, t = self._t(s), self._t(t)
        la_s, la_t, std_s, std_t = self._log_alpha(s), self._log_alpha(t), self._std(s), self._std(t)
        ratio = torch.exp(la_t - la_s)
        # lambda_t - lambda_s, each lambda = 2 (log alpha - log std)
        dlam = 2.0 * ((la_t - la_s) - (torch.log(std_t) - torch.log(std_s)))
        return ratio, std_t * torch.sqrt(-torch.expm1(dlam.clamp(max=0.0)))

    def sde(self, x: torch.Tensor, t: TimeLike) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward SDE coefficients: ``(drift f(t) x of shape (B, ...), diffusion g(t) of shape (B,))``."""
        t = self._t(t, x)
        return append_dims(self._f(t), x.ndim) * x, torch.sqrt(self._g2(t))

    def prior_sample(
        self,
        shape: Sequence[int],
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """Draw ``x_T ~ N(0, prior_std^2 I)`` of the given shape ``(B, ...)``."""
        return self.prior_std * torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior ``N(0, prior_std^2 I)`` at ``z``: shape ``(B,)``."""
        d = z[0].numel()
        s2 = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * sum_except_batch(z.pow(2)) / s2

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Anderson 1982), or with ``probability_flow`` its probability-flow ODE."""
        return ReverseSDE(self, score_fn, probability_flow)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"

    def config(self) -> dict:
        """Plain-data description, enough to rebuild the SDE with :func:`scoresde.sde_from_config`."""
        return {"name": type(self).__name__}


class ReverseSDE:
    """Reverse-time dynamics of a forward SDE, with time running from ``T`` down to 0.

    SDE (Anderson 1982; Song et al. 2021, eq. 6):  ``dx = [f x - g^2 score(x, t)] dt + g dW_bar``.
    Probability-flow ODE (Song et al. 2021, eq. 13): ``dx/dt = f x - 1/2 g^2 score(x, t)``.
    ``dt`` is negative when integrating from T to 0.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.T = forward.T

    def sde(self, x: torch.Tensor, t: TimeLike, **model_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(drift (B, ...), diffusion (B,))`` of the reverse dynamics at ``(x, t)``."""
        t = self.forward._t(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        f, g2 = self.forward._f(t), self.forward._g2(t)
        score = self.score_fn(x, t, **model_kwargs)
        weight = 0.5 if self.probability_flow else 1.0
        drift = append_dims(f, x.ndim) * x - append_dims(weight * g2, x.ndim) * score
        diffusion = torch.zeros_like(g2) if self.probability_flow else torch.sqrt(g2)
        return drift, diffusion


def _check_time_horizon(T: float) -> float:
    return check_positive("T", T)


class VPSDE(SDE):
    """Variance-preserving SDE, the continuous limit of DDPM's linear beta schedule (Song et al. 2021).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``dx = -1/2 beta x dt + sqrt(beta) dW``,
    ``alpha(t) = exp(-1/2 int_0^t beta)``, ``std(t) = sqrt(1 - alpha^2)``. With DDPM's
    ``beta_i`` from 1e-4 to 0.02 over N = 1000 steps, ``beta_min = N 1e-4 = 0.1`` and
    ``beta_max = N 0.02 = 20`` (see :mod:`scoresde.ddpm`).
    """

    t_min = 1e-3
    prior_std = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        self.beta_min = check_positive("beta_min", beta_min)
        self.beta_max = check_positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got beta_min={beta_min}, beta_max={beta_max}")
        self.T = _check_time_horizon(T)

    def _int_beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _log_alpha(self, t):
        return -0.5 * self._int_beta(t)

    def _std(self, t):
        return torch.sqrt(-torch.expm1(-self._int_beta(t)))

    def _f(self, t):
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def _g2(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _t_from_log_snr(self, lam):
        # int_0^t beta = log(1 + e^{-lambda}); solve the quadratic in a cancellation-free form.
        c = torch.nn.functional.softplus(-lam)
        d = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * c))

    def config(self):
        return {"name": "VPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. 11): the VP drift with ``g^2 = beta(t) (1 - alpha(t)^4)``.

    Same ``alpha(t)`` as VP, ``std(t) = 1 - alpha(t)^2`` (always below the VP std).
    """

    def _std(self, t):
        return -torch.expm1(-self._int_beta(t))

    def _g2(self, t):
        return (self.beta_min + t * (self.beta_max - self.beta_min)) * -torch.expm1(-2.0 * self._int_beta(t))

    def _t_from_log_snr(self, lam):
        # alpha^2 = a solves a / (1 - a)^2 = e^lambda; with u = e^{-lambda},
        # 1 - a = u / (sqrt(u + u^2/4) + u/2).
        u = torch.exp(-lam)
        one_minus_a = u / (torch.sqrt(u + 0.25 * u * u) + 0.5 * u)
        c = -torch.log1p(-one_minus_a)
        d = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * c))

    def config(self):
        return {"name": "SubVPSDE", "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN++ in continuous time, Song et al. 2021, eq. 9).

    ``std(t) = sigma_min (sigma_max / sigma_min)^t``, ``alpha = 1``,
    ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dW``. As in the paper, ``x_0`` counts as
    already carrying noise ``sigma_min``, so ``std(0) = sigma_min`` rather than 0.
    """

    t_min = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must be > sigma_min; got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.T = _check_time_horizon(T)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def _log_alpha(self, t):
        return 0.0 * t  # keeps the autograd graph (zeros_like would not)

    def _std(self, t):
        return self.sigma_min * torch.exp(t / self.T * self._log_ratio)

    def _f(self, t):
        return 0.0 * t  # keeps the autograd graph (zeros_like would not)

    def _g2(self, t):
        return 2.0 * self._log_ratio / self.T * self._std(t) ** 2

    def _t_from_log_snr(self, lam):
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio * self.T

    def config(self):
        return {"name": "VESDE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T}


class CosineVPSDE(SDE):
    """VP SDE with the cosine schedule of Nichol & Dhariwal 2021 ("Improved DDPM").

    ``alpha(t)^2 = cos^2(phi(t)) / cos^2(phi(0))`` with ``phi(t) = (t + s) / (1 + s) pi/2``;
    ``f = -tan(phi) pi / (2 (1 + s))``, ``g^2 = -2 f``. The schedule is singular at t = 1, so the
    horizon defaults to ``T = 0.9946`` (as in DPM-Solver), where ``alpha(T) ~ 0.0084``.
    """

    t_min = 1e-3
    prior_std = 1.0

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        self.s = check_positive("s", s)
        self.T = _check_time_horizon(T)
        if not self.T < 1.0:
            raise ValueError(f"T must be < 1 for the cosine schedule (singular at 1); got T={T}")
        self._log_cos0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def _phi(self, t):
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _log_alpha(self, t):
        # clamp: rounding can make log alpha(0) a hair above 0, and std(0) the sqrt of a negative
        return (torch.log(torch.cos(self._phi(t))) - self._log_cos0).clamp(max=0.0)

    def _std(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def _f(self, t):
        return -torch.tan(self._phi(t)) * (math.pi / (2 * (1 + self.s)))

    def _g2(self, t):
        return -2.0 * self._f(t)

    def _t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(lambda)  =>  cos(phi) = sqrt(sigmoid(lambda)) cos(phi(0)).
        log_cos = 0.5 * torch.nn.functional.logsigmoid(lam) + self._log_cos0
        return torch.arccos(torch.exp(log_cos)) * (2 * (1 + self.s) / math.pi) - self.s

    def config(self):
        return {"name": "CosineVPSDE", "s": self.s, "T": self.T}


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE}


def sde_from_config(config: dict) -> SDE:
    """Rebuild an SDE from :meth:`SDE.config` output (or ``{"name": "vp", ...}`` with a short name)."""
    config = dict(config)
    name = config.pop("name")
    by_class = {cls.__name__: cls for cls in SDES.values()}
    cls = SDES.get(name) or by_class.get(name)
    if cls is None:
        raise ValueError(f"unknown SDE name {name!r}; expected one of {sorted(SDES)}")
    return cls(**config)
