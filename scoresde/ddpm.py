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

from .sde import SDE, VPSDE


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


def _unwrap(out):
    # diffusers returns a dataclass with `.sample`; tuples put the tensor first.
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


class DDPMEpsAdapter(torch.nn.Module):
    """Make a DDPM network ``net(x, timestep) -> eps`` a continuous-time ``model(x, t) -> eps``.

    The network was trained with ``abar_i`` (``alphas_cumprod``); for each continuous ``t`` the adapter
    finds the fractional timestep ``i(t)`` at which ``log abar`` (piecewise-linear in i, with
    ``abar_{-1} = 1``) equals ``2 log alpha(t)`` of ``sde``, and calls ``net(x, i(t), **kwargs)``.
    This follows diffusers' ``UNet2DModel`` convention (float timesteps accepted; outputs with a
    ``.sample`` field are unwrapped). Times beyond the discrete range are clamped to ``[-1, N-1]``.
    """

    def __init__(self, net: Callable, sde: SDE, alphas_cumprod: Optional[torch.Tensor] = None):
        super().__init__()
        self.net, self.sde = net, sde
        if alphas_cumprod is None:
            alphas_cumprod = torch.exp(2 * sde.log_alpha(ddpm_times(1000, sde.T)))
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # log abar at indices -1, 0, ..., N-1 (decreasing)
        self.register_buffer("_log_abar", torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)]))

    @property
    def num_steps(self) -> int:
        return self._log_abar.numel() - 1

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep for continuous time ``t`` (same shape)."""
        target = (2 * self.sde.log_alpha(t)).to(torch.float64)
        table = -self._log_abar.to(target.device)  # increasing
        hi = torch.searchsorted(table, -target).clamp(1, table.numel() - 1)
        lo = hi - 1
        w = ((-target - table[lo]) / (table[hi] - table[lo])).clamp(0.0, 1.0)
        return (lo.to(torch.float64) + w - 1.0).to(t.dtype)

    def time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Continuous time whose ``alpha(t)^2`` equals the (interpolated) ``abar`` at ``timestep``,
        clamped to ``[0, T]``."""
        i = torch.as_tensor(timestep, dtype=torch.float64).clamp(-1, self.num_steps - 1) + 1
        lo = i.floor().long().clamp(max=self.num_steps - 1)
        w = i - lo
        log_abar = (1 - w) * self._log_abar[lo] + w * self._log_abar[lo + 1]
        lam = log_abar - torch.log(-torch.expm1(log_abar))
        # the last discrete steps may be noisier than alpha(T): clamp into the SDE's horizon
        return self.sde.t_from_log_snr(lam).clamp(0.0, self.sde.T)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return _unwrap(self.net(x, self.timestep(t), **model_kwargs))
