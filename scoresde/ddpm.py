"""The bridge between DDPM's discrete schedule and continuous-time VP SDEs.

DDPM (Ho et al. 2020) trains on integer timesteps ``i in {0..N-1}`` with ``x_i = sqrt(abar_i) x_0 +
sqrt(1 - abar_i) eps``, ``abar_i = prod_{j<=i} (1 - beta_j)``. Its continuous limit (Song et al. 2021,
appendix B) is the VP SDE with ``beta(t) = N beta_{tN}``, so the linear schedule from ``beta_start``
to ``beta_end`` becomes ``VPSDE(beta_min = N beta_start, beta_max = N beta_end)`` and discrete step
``i`` sits at time ``t_i = (i + 1) / N`` (the end of its interval).

How close: for the linear schedule 1e-4 .. 0.02 with N = 1000, ``|abar_i - alpha(t_i)^2| <= 1e-3``
(largest 8.1e-4) and ``|log abar_i - log alpha(t_i)^2| <= 0.07`` (largest 0.068, at i = N-1). The
log error is dominated by the second-order term of ``log(1 - beta) = -beta - beta^2/2 - ...`` that the continuous
limit drops, ``sum_{j<=i} beta_j^2 / 2``; the Riemann-sum mismatch adds under 3e-3 (tested in ``tests/test_ddpm.py``). To run a DDPM-trained network exactly at the
noise level it was trained on, :class:`DDPMEpsAdapter` does not use ``t_i``: it maps each continuous
``t`` to the fractional timestep whose interpolated ``log abar`` equals ``log alpha(t)^2``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .adapters import DiscreteTimeAdapter
from .sde import SDE, VPSDE, register_sde


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule ``beta_i = beta_start + i/(N-1) (beta_end - beta_start)``, float64 ``(N,)``."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2; got {num_steps}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``abar_i = prod_{j<=i} (1 - beta_j)``, computed as exp(cumsum(log1p(-beta)))."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or bool(torch.any(betas <= 0)) or bool(torch.any(betas >= 1)):
        raise ValueError("betas must be a 1-D tensor with entries in (0, 1)")
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0))


def vpsde_from_ddpm(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSDE:
    """Continuous limit of DDPM's linear schedule: ``VPSDE(N beta_start, N beta_end)``."""
    linear_betas(num_steps, beta_start, beta_end)  # validates
    return VPSDE(beta_min=num_steps * beta_start, beta_max=num_steps * beta_end)


def ddpm_times(num_steps: int, T: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Continuous time of each discrete step: ``t_i = (i + 1) / N * T``, shape ``(N,)``."""
    return (torch.arange(num_steps, dtype=dtype) + 1) / num_steps * T


def ddpm_betas_from_sde(sde: SDE, num_steps: int = 1000) -> torch.Tensor:
    """Discretise a VP-type SDE into ``N`` DDPM betas with ``abar_i = alpha(t_i)^2`` exactly.

    ``beta_i = 1 - alpha(t_i)^2 / alpha(t_{i-1})^2`` with ``t_{-1} = 0``.
    """
    t = torch.cat([torch.zeros(1, dtype=torch.float64), ddpm_times(num_steps, sde.T)])
    log_a2 = 2 * sde.log_alpha(t)
    betas = -torch.expm1(log_a2[1:] - log_a2[:-1])
    if not bool(torch.all(betas > 0)):
        raise ValueError(f"{sde!r} has a constant alpha(t); only SDEs whose alpha decreases map to DDPM betas")
    return betas


class DDPMEpsAdapter(DiscreteTimeAdapter):
    """Make a DDPM network ``net(x, timestep) -> eps`` a continuous-time ``model(x, t) -> eps``.

    :class:`scoresde.adapters.DiscreteTimeAdapter` with ``prediction="eps"``: for each continuous ``t``
    the network is called at the fractional timestep ``i(t)`` at which ``log abar`` (piecewise-linear in
    i, with ``abar_{-1} = 1``) equals ``2 log alpha(t)`` of ``sde``. Outputs with a ``.sample`` field
    (diffusers) are unwrapped; a ``2C``-channel (learned-variance) output keeps its first ``C`` channels.
    """

    def __init__(self, net: Callable, sde: SDE, alphas_cumprod: Optional[torch.Tensor] = None,
                 learned_variance: Optional[bool] = None):
        super().__init__(net, sde, alphas_cumprod, "eps", learned_variance)


class DiscreteVPSDE(SDE):
    """The VP SDE whose ``alpha(t)^2`` passes through a discrete schedule's ``abar_i`` exactly.

    Knots at ``t_i = (i + 1) T / N`` (``i = 0..N-1``) and ``t = 0``; ``log alpha(t)^2`` is linear
    between knots (with ``abar(0) = 1``), ``std = sqrt(1 - alpha^2)``, so ``f = d log alpha / dt`` is
    constant on each interval and ``g^2 = -2 f`` (VP: ``d std^2/dt - 2 f std^2 = -2 f``). A network
    trained on the discrete chain (DDPM, diffusers) is thus evaluated by every sampler at a time whose
    noise level it was trained on: discrete step ``i`` is time ``t_i`` exactly, fractional steps
    interpolate ``log abar``. ``prior_std = 1``; ``t_min = T / N`` (the first trained level).

    Args:
        alphas_cumprod: ``abar`` of shape ``(N,)``, strictly decreasing in ``(0, 1)``; default DDPM's
            linear schedule (``beta`` 1e-4 .. 0.02, N = 1000).
        T: time horizon.
    """

    prior_std = 1.0

    def __init__(self, alphas_cumprod=None, T: float = 1.0):
        if alphas_cumprod is None:
            alphas_cumprod = _default_abar()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if abar.numel() < 2 or bool(torch.any(abar <= 0)) or bool(torch.any(abar >= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 entries in (0, 1)")
        if bool(torch.any(abar[1:] >= abar[:-1])):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.T = float(T)
        if not self.T > 0:
            raise ValueError(f"T must be positive; got {T!r}")
        self.num_steps = abar.numel()
        self.t_min = self.T / self.num_steps
        self._abar = abar
        # -log abar at knots 0, t_0, ..., t_{N-1}: increasing from 0
        self._nla = torch.cat([torch.zeros(1, dtype=torch.float64), -torch.log(abar)])

    @property
    def alphas_cumprod(self) -> list:
        return self._abar.tolist()

    def _table(self, t: torch.Tensor) -> torch.Tensor:
        return self._nla.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)

    def _segment(self, t: torch.Tensor):
        u = t * (self.num_steps / self.T)
        k = u.detach().floor().clamp(0, self.num_steps - 1)
        return u - k, k.long()

    def _log_alpha(self, t):
        tab = self._table(t)
        w, k = self._segment(t)
        return -0.5 * (tab[k] + w * (tab[k + 1] - tab[k]))

    def _std(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def _f(self, t):
        tab = self._table(t)
        _, k = self._segment(t)
        return -0.5 * (tab[k + 1] - tab[k]) * (self.num_steps / self.T) + 0.0 * t

    def _g2(self, t):
        return -2.0 * self._f(t)

    def _t_from_log_snr(self, lam):
        # -log alpha^2 = softplus(-lambda); invert the piecewise-linear table
        target = torch.nn.functional.softplus(-lam.to(torch.float64))
        tab = self._nla.to(target.device)
        hi = torch.searchsorted(tab, target.contiguous()).clamp(1, self.num_steps)
        lo = hi - 1
        w = ((target - tab[lo]) / (tab[hi] - tab[lo])).clamp(0.0, 1.0)
        return ((lo.to(torch.float64) + w) * (self.T / self.num_steps)).to(lam.dtype)

    def config(self):
        return {"name": "DiscreteVPSDE", "alphas_cumprod": self.alphas_cumprod, "T": self.T}

    def __repr__(self) -> str:
        a = self._abar
        return f"DiscreteVPSDE(N={self.num_steps}, abar={float(a[0]):.6g}..{float(a[-1]):.4g}, T={self.T:g})"


def _default_abar() -> torch.Tensor:
    return alphas_cumprod(linear_betas())


register_sde("DiscreteVPSDE", DiscreteVPSDE, listed=False)
