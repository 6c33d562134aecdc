"""The reverse SDE integrated by torchsde (Li et al. 2020, "Scalable Gradients for Stochastic
Differential Equations"), through its public ``sdeint``.

In forward time ``tau = T - t`` the reverse SDE of any linear forward SDE reads

    dy = -(f(t) y - g(t)^2 score(y, t)) dtau + g(t) dW_tau,     score = -eps / std(t),

with additive noise (``g`` is free of ``y``), so Ito and Stratonovich forms coincide and both kinds
of torchsde method apply unchanged. Network evaluations per step: what the method costs (euler,
milstein, euler_heun 1; srk, midpoint, heun 2), plus one with ``denoise_final``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torchsde

from scoresde._tensor import unchecked
from scoresde.sde import SDE

from .base import Run
from .registry import GridOptions, Sampler, knob
from .stochastic import StepGrid, finish_denoise, tweedie

Tensor = torch.Tensor

#: torchsde methods that integrate our reverse SDE, with the calculus each one assumes. Not offered:
#: ``log_ode`` (needs Levy areas beyond space-time) and ``reversible_heun`` (needs the full
#: ``(B, D, D)`` diffusion matrix torchsde builds for additive noise).
TORCHSDE_METHODS: Dict[str, str] = {
    "euler": "ito",
    "milstein": "ito",
    "srk": "ito",
    "midpoint": "stratonovich",
    "heun": "stratonovich",
    "euler_heun": "stratonovich",
}


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
        if self.run.wants_denoised:  # Tweedie's estimate, only when someone reads it
            self.last_denoised = tweedie(x, eps, a, s)
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


class _SampleBrownian(torchsde.BaseBrownian):
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

    def __repr__(self) -> str:
        return f"_SampleBrownian(tau=[{self.tau0:.6g}, {self.tau1:.6g}], cells={self.n_sub})"

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


_ENTROPY_STREAM = 0x7FFF0000  # far above the streams the step loop uses
# Levy-area noise (SRK) of the W cell with stream k is stream _LEVY_STREAMS + k, so the W streams run
# 0, 1, 2, ... in order and Run.noise can draw them ahead in blocks.
_LEVY_STREAMS = 0x40000000


def _seed_entropy(run: Run, like: Tensor) -> int:
    """A 63-bit entropy for torchsde's BrownianInterval, derived from the run's noise (reproducible)."""
    z = run.noise(torch.zeros(like.shape[0], 4, dtype=torch.float64), _ENTROPY_STREAM)
    return int.from_bytes(hashlib.sha256(z.numpy().tobytes()).digest()[:8], "little") >> 1


def _reshape(v: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    return None if v is None else v.reshape(shape)


@dataclass(frozen=True)
class TorchsdeOptions(GridOptions):
    """Options of :func:`sde`."""

    method: str = knob("euler", "torchsde method", tuple(TORCHSDE_METHODS))
    dt: Optional[float] = knob(None, "largest fixed step inside a report interval (default: one step per interval)")
    adaptive: bool = knob(False, "error-controlled steps (needs brownian='interval')")
    rtol: float = knob(1e-5, "relative tolerance of adaptive steps")
    atol: float = knob(1e-4, "absolute tolerance of adaptive steps")
    dt_min: float = knob(1e-5, "smallest adaptive step")
    brownian: str = knob("sample", "'sample': per-sample increments (batch-independent); 'interval': torchsde's BrownianInterval", ("sample", "interval"))

    def check(self) -> None:
        super().check()
        if self.adaptive and self.brownian == "sample":
            raise ValueError("adaptive=True needs brownian='interval' (per-sample increments exist on a fixed grid only)")
        if self.dt is not None and not self.dt > 0:
            raise ValueError(f"dt must be positive; got {self.dt!r}")


def sde(run: Run, steps: int, opts: TorchsdeOptions) -> Tensor:
    """The reverse SDE integrated by ``torchsde.sdeint`` in forward time ``tau = T - t``.

    ``dy = -(f y - g^2 score) dtau + g dW`` on flat states ``(B, D)`` (reshaped back to any rank).
    ``steps`` report intervals follow the grid (``schedule`` or ``t_grid``); inside each, the solver
    takes fixed steps of at most ``dt`` (default: one step per interval) or, with
    ``adaptive=True``, error-controlled steps (``rtol``, ``atol``, ``dt_min``). ``sdeint`` is called
    once per interval, so the NaN guard, the callback and the state hook run after each.

    ``brownian="sample"`` (default) builds the Brownian increments per sample from ``Run.noise``,
    so sample i is the same in any batch; it supports fixed steps only. ``brownian="interval"`` uses
    torchsde's ``BrownianInterval`` seeded from the generator: reproducible for a given seed and
    batch, and it supports adaptive steps, but torchsde draws the whole ``(B, D)`` block at once, so
    sample i then depends on the batch size.
    """
    sde_ = run.sde
    grid = StepGrid(sde_, opts.grid(sde_, steps))
    taus = [sde_.T - float(t) for t in grid.t]
    shape = run.x.shape
    y = run.x.reshape(shape[0], -1)
    rsde = _TorchsdeReverse(run, sde_, shape, TORCHSDE_METHODS[opts.method])
    rsde.precompute(taus)
    bm_all = None
    if opts.brownian == "interval":
        bm_all = torchsde.BrownianInterval(
            t0=taus[0], t1=taus[-1], size=tuple(y.shape), dtype=y.dtype, device=y.device,
            entropy=_seed_entropy(run, y), levy_area_approximation="space-time" if opts.method == "srk" else "none",
        )
    extra = None
    stream = 0
    n_subs = [1 if opts.dt is None else max(1, math.ceil((taus[k + 1] - taus[k]) / opts.dt - 1e-9))
              for k in range(len(grid))]
    if bm_all is None:
        run.streams = sum(n_subs)  # W cells draw streams 0, 1, 2, ... in order
    for k in run.steps(len(grid), desc="sde"):
        tau0, tau1, n_sub = taus[k], taus[k + 1], n_subs[k]
        h = (tau1 - tau0) / n_sub
        if bm_all is None:
            bm = _SampleBrownian(run, y, tau0, tau1, n_sub, stream)
            stream += n_sub
        else:
            bm = bm_all
        ys, extra = torchsde.sdeint(
            rsde, y, torch.tensor([tau0, tau1], dtype=torch.float64), bm=bm, method=opts.method,
            dt=h * (1 + 1e-10),  # the solver clips its last step at tau1: no sliver step from rounding
            adaptive=opts.adaptive, rtol=opts.rtol, atol=opts.atol, dt_min=opts.dt_min,
            extra=True, extra_solver_state=extra,
        )
        y = ys[-1]
        x = run.report(k, grid.tl[k + 1], y.reshape(shape), _reshape(rsde.last_denoised, shape), t_prev=grid.tl[k])
        y = x.reshape(shape[0], -1)
    return finish_denoise(run, grid, y.reshape(shape), opts.denoise_final)


RECORD = Sampler("sde", sde, TorchsdeOptions, 1000, True, ("alpha", "std", "sde", "transition"),
                 summary="the reverse SDE through torchsde.sdeint (any of its methods)",
                 nfe="steps x the method's evaluations per step (+1 with denoise_final)")
