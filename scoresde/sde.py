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

import inspect
import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Optional, Sequence, Tuple

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

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of ``log_snr``. This default solves ``log_snr(t) = lam`` numerically (bisection on
        ``[0, T]`` in float64, 64 halvings, since ``log_snr`` decreases); values of ``lam`` beyond
        ``[log_snr(T), log_snr(0)]`` give ``T`` or 0. Subclasses with a closed form override it."""
        target = lam.detach().to(torch.float64)
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, float(self.T))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            val = 2.0 * (self._log_alpha(mid) - torch.log(self._std(mid)))
            above = val > target  # log_snr(mid) too large: the answer is later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype if lam.is_floating_point() else torch.get_default_dtype())

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
        """Plain-data description, enough to rebuild the SDE with :func:`scoresde.sde_from_config`.

        This default reads each ``__init__`` parameter from the attribute of the same name (so a
        subclass that stores its arguments as ``self.<name>`` needs no ``config`` of its own) and
        names the class by its registered name (:func:`register_sde`) or its class name.
        """
        out: dict = {"name": _registered_name(type(self))}
        try:
            sig = inspect.signature(type(self).__init__)
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            return out
        for p in list(sig.parameters.values())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if hasattr(self, p.name):
                value = getattr(self, p.name)
                if isinstance(value, (bool, int, float, str, type(None), list, tuple, dict)):
                    out[p.name] = list(value) if isinstance(value, tuple) else value
        return out


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
        return {"name": _registered_name(type(self)), "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


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
        return {"name": _registered_name(type(self)), "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


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
        return {"name": _registered_name(type(self)), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T}


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
        return {"name": _registered_name(type(self)), "s": self.s, "T": self.T}


#: short name -> SDE class: the built-ins, plus every class added with :func:`register_sde`
SDES: Dict[str, type] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE}

#: class name -> class, for classes rebuilt from configs but not listed in SDES (e.g. DiscreteVPSDE)
_CLASSES: Dict[str, type] = {}


def _registered_name(cls: type) -> str:
    for name, c in SDES.items():
        if c is cls and name not in ("vp", "subvp", "ve", "cosine"):
            return name
    return cls.__name__


def register_sde(name: str, cls: Optional[type] = None, *, listed: bool = True):
    """Register an :class:`SDE` subclass so :func:`sde_from_config`, checkpoints and ``TrainConfig(sde=name)``
    can rebuild it by name. Use as ``register_sde("mine", MySDE)`` or as a class decorator
    ``@register_sde("mine")``; returns the class.

    ``config()`` then records ``name``; a checkpoint of a run with a custom SDE loads in a process
    that has registered the same class under the same name. Registering a different class under a
    name already taken raises ``ValueError``. ``listed=False`` keeps it out of :data:`SDES` (rebuilt by
    class name only).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an SDE name must be a non-empty string; got {name!r}")

    def add(c: type) -> type:
        if not (isinstance(c, type) and issubclass(c, SDE)):
            raise ValueError(f"register_sde needs a subclass of scoresde.SDE; got {c!r}")
        if listed:
            taken = SDES.get(name)
            if taken is not None and taken is not c:
                raise ValueError(f"SDE name {name!r} is already registered to {taken.__module__}.{taken.__qualname__}")
            SDES[name] = c
        _CLASSES[c.__name__] = c
        return c

    return add if cls is None else add(cls)


def sde_from_config(config: dict) -> SDE:
    """Rebuild an SDE from :meth:`SDE.config` output (or ``{"name": "vp", ...}`` with a short name)."""
    config = dict(config)
    name = config.pop("name")
    by_class = {cls.__name__: cls for cls in SDES.values()}
    cls = SDES.get(name) or by_class.get(name) or _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown SDE name {name!r}; expected one of {sorted(SDES)} "
                         "(register a custom SDE with scoresde.register_sde before rebuilding it)")
    return cls(**config)


def check_sde(sde: SDE, *, times: int = 9, rtol: float = 1e-4, data_std: float = 1.0, max_signal: float = 0.1) -> SDE:
    """Check a (custom) SDE against itself; raise ``ValueError`` naming the first inconsistency.

    All in float64 at ``times`` points spread over ``[t_min, T]``:

    - ``alpha(0) = 1`` (``x_0`` is the data);
    - ``std(t) > 0``, ``g(t)^2 > 0`` and ``log_snr`` strictly decreasing;
    - drift: ``f = d log alpha / dt`` and diffusion ``g^2 = d std^2/dt - 2 f std^2`` (the two identities
      that make ``N(alpha x_0, std^2)`` the SDE's marginal, Song et al. 2021 appendix; Kingma et al.
      2021), against one-sided finite differences (the better of the left and right one, so a
      schedule with kinks passes), to relative tolerance ``rtol``;
    - ``t_from_log_snr`` inverts ``log_snr``;
    - the prior: ``prior_std`` equals ``std(T)`` (to 5 %), and ``alpha(T) data_std / std(T) <=
      max_signal`` so that ``N(0, prior_std^2)`` is close to the marginal at ``T`` for data of
      per-coordinate spread ``data_std``.

    Returns ``sde`` (so ``sde = check_sde(MySDE())`` reads naturally).
    """
    name = type(sde).__name__
    t_lo = float(getattr(sde, "t_min", 1e-3))
    T = float(sde.T)
    if not 0.0 < t_lo < T:
        raise ValueError(f"{name}: t_min={t_lo} must lie in (0, T={T})")
    # interior points, avoiding the ends by a little so both one-sided differences exist
    u = torch.linspace(0.0, 1.0, times, dtype=torch.float64)
    t = t_lo + (T - t_lo) * (0.03 + 0.94 * u) ** 1.0
    la0 = float(sde.log_alpha(torch.zeros(1, dtype=torch.float64))[0])
    if not abs(la0) <= 1e-6:
        raise ValueError(f"{name}: alpha(0) = {math.exp(la0):.6g}, but must be 1 (log_alpha(0) = {la0:.3g})")
    la, std = sde.log_alpha(t), sde.std(t)
    if not bool(torch.all(torch.isfinite(la))) or not bool(torch.all(torch.isfinite(std))):
        raise ValueError(f"{name}: log_alpha or std is not finite on [t_min, T]")
    if not bool(torch.all(std > 0)):
        raise ValueError(f"{name}: std(t) must be positive on [t_min, T]; got min {float(std.min()):.3g}")
    lam = sde.log_snr(t)
    if not bool(torch.all(lam[1:] < lam[:-1])):
        raise ValueError(f"{name}: log_snr(t) = 2 log(alpha/std) must decrease strictly in t")
    h = 1e-6 * T
    tp, tm = t + h, t - h

    def one_sided(fn, ref):
        fwd = (fn(tp) - fn(t)) / h
        bwd = (fn(t) - fn(tm)) / h
        scale = torch.maximum(ref.abs(), fwd.abs()).clamp(min=1e-8)
        err = torch.minimum((fwd - ref).abs(), (bwd - ref).abs()) / scale
        return err, fwd

    f = sde._f(t)
    g2 = sde._g2(t)
    err_f, dla = one_sided(sde._log_alpha, f)
    if float(err_f.max()) > rtol:
        k = int(err_f.argmax())
        raise ValueError(f"{name}: drift f(t) disagrees with d log alpha/dt (at t={float(t[k]):.4g}: "
                         f"f={float(f[k]):.6g}, d log alpha/dt={float(dla[k]):.6g}); f must be d log alpha / dt")
    if not bool(torch.all(g2 > 0)):
        raise ValueError(f"{name}: g^2(t) must be positive on [t_min, T]; got min {float(g2.min()):.3g}")

    def var(tt):
        return sde._std(tt) ** 2

    fwd = (var(tp) - var(t)) / h - 2 * f * std**2
    bwd = (var(t) - var(tm)) / h - 2 * f * std**2
    scale = torch.maximum(g2.abs(), fwd.abs()).clamp(min=1e-12)
    err_g = torch.minimum((fwd - g2).abs(), (bwd - g2).abs()) / scale
    if float(err_g.max()) > rtol:
        k = int(err_g.argmax())
        want = float(fwd[k])
        raise ValueError(f"{name}: g^2(t) disagrees with d std^2/dt - 2 f std^2 (at t={float(t[k]):.4g}: "
                         f"g^2={float(g2[k]):.6g}, expected {want:.6g})")
    back = sde.t_from_log_snr(lam)
    err_inv = (back - t).abs() / T
    if not bool(torch.all(torch.isfinite(back))) or float(err_inv.max()) > 1e-6:
        k = int(err_inv.nan_to_num(float("inf")).argmax())
        raise ValueError(f"{name}: t_from_log_snr is not the inverse of log_snr (t={float(t[k]):.4g} -> "
                         f"log_snr={float(lam[k]):.6g} -> t={float(back[k]):.6g})")
    tT = torch.tensor([T], dtype=torch.float64)
    a_T, s_T = float(sde.alpha(tT)[0]), float(sde.std(tT)[0])
    prior = float(sde.prior_std)
    if a_T * data_std / s_T > max_signal:
        raise ValueError(f"{name}: at T the signal is not drowned (alpha(T) data_std / std(T) = {a_T * data_std / s_T:.3g} > "
                         f"{max_signal}); N(0, prior_std^2) is a poor prior: raise T or the final noise level")
    if not (prior > 0 and math.isfinite(prior)) or abs(prior - s_T) > 0.05 * s_T:
        raise ValueError(f"{name}: prior_std={prior:.6g} does not match std(T)={s_T:.6g}; set prior_std to std(T)")
    return sde
