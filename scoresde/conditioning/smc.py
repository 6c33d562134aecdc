"""A fully adapted particle filter for linear-Gaussian observations (in the spirit of filtering
posterior sampling, Dou & Song 2024, and twisted SMC, Wu et al. 2023).

Target. The model's ancestral chain ``p(x_{t_0}) prod_i p(x_{t_{i+1}} | x_{t_i})`` on a grid
``T = t_0 > ... > t_N = t_min``, with Gaussian reverse kernels ``N(mu_i(x), v_i I)`` (the DDPM
posterior at the model's Tweedie estimate, :func:`ancestral_moments`), tilted at the end by
``g_N(x) = N(alpha y; A x, std^2 A A^T + alpha^2 sigma_y^2 I)`` at ``t_min``: the likelihood of
``y`` given ``x_{t_min}`` when ``x0 = x_{t_min} / alpha`` up to the ``std`` noise, i.e. ``p(x0 | y)``
as ``t_min -> 0`` and the steps -> 0.

Twists. ``g_i(x) = N(alpha_i y; A x, std_i^2 A A^T + alpha_i^2 sigma_y^2 I)``: ``A x_t`` of a forward
path equals ``alpha_t A x0 + std_t A eps``, so ``alpha_t y`` observes ``x_t`` with that covariance
(the filtering observations of FPS). Proposal: the reverse kernel conditioned on that linear-Gaussian
observation, ``q(x' | x) ∝ N(x'; mu, v I) g_{i+1}(x')`` — exact Gaussian conditioning, drawn by
Matheron's rule ``x' = x~ + v A^T G^{-1} (alpha' y - A x~ - e)`` with ``x~ ~ N(mu, v I)``,
``e ~ N(0, std'^2 A A^T + alpha'^2 sigma_y^2 I)``, ``G = (v + std'^2) A A^T + alpha'^2 sigma_y^2 I``.
Its normaliser ``Z_i(x) = N(alpha' y; A mu, G)`` makes the incremental weight
``Z_i(x) / g_i(x)`` depend on the current particle only, so particles are weighted and resampled
*before* they move (a fully adapted auxiliary filter). Whatever the twists, the weighted particle
system targets the tilted chain exactly as the number of particles grows (Del Moral 2004); good
twists only lower the variance.

Cost: ``steps + 1`` network evaluations per particle (the last one the final Tweedie denoising), so
``(steps + 1) * particles`` per output sample; each step is one batched call on all particles.

Reproducibility: output sample ``i`` runs its own ``particles`` particles; their Gaussian noise is
keyed by ``(seed, i * particles + j)`` and the resampling uniforms by ``(seed', i)``
(:class:`SampleNoise`), so output ``i`` does not depend on the batch it is drawn in.
Systematic resampling at every step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch

from ..noise import SampleNoise, as_sample_noise
from ..sde import SDE
from ..parameterization import eps_to_x0
from .methods import Observation, _times, ancestral_moments

Tensor = torch.Tensor

_RESAMPLE_SALT = 0x5EED5A17


def _log_gauss(obs: Observation, r: Tensor, a: float, b: float) -> Tensor:
    """``log N(r; 0, a A A^T + b I)`` per sample, ``r`` of shape ``(B, *out_shape)``."""
    op = obs.operator
    lam = op.gram_eigenvalues(torch.float64).to(r.device)
    logdet = float(torch.log(a * lam + b).sum())
    quad = (r * op.solve(r, a, b)).reshape(r.shape[0], -1).sum(1)
    return -0.5 * (quad + logdet + lam.numel() * math.log(2 * math.pi))


def systematic_resample(logw: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling of ``G`` groups of ``P`` particles.

    Args:
        logw: ``(G, P)`` log-weights (unnormalised).
        u: ``(G,)`` uniforms in ``[0, 1)``, one per group.

    Returns ``(G, P)`` ancestor indices: offspring ``j`` takes the particle whose cumulative
    normalised weight first exceeds ``(u + j) / P``.
    """
    g, p = logw.shape
    w = torch.softmax(logw, dim=1)
    cdf = torch.cumsum(w, dim=1)
    cdf[:, -1] = 1.0
    pos = (u[:, None] + torch.arange(p, dtype=w.dtype, device=w.device)[None]) / p
    return torch.searchsorted(cdf, pos.contiguous()).clamp(max=p - 1)


def smc_sample(
    model: Callable[..., Tensor],
    sde: SDE,
    obs: Observation,
    num_samples: int,
    *,
    particles: int = 16,
    steps: int = 100,
    schedule: str = "logsnr",
    generator: Any = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Any] = None,
) -> Tuple[Tensor, int]:
    """Draw ``num_samples`` samples of ``p(x0 | y)``, each from its own filter of ``particles`` particles.

    Args:
        model: unconditional ``model(x, t) -> eps``.
        obs: the observation (any ``sigma_y >= 0``; one ``y`` for all, or one per output sample).
        particles: particles per output sample (1: the proposal chain alone, no correction).
        steps: reverse steps from T to ``sde.t_min``.
        schedule: their time grid (:func:`solvers.time_grid`; ``logsnr`` puts more steps near the data,
            where the ancestral kernel's discretisation error of narrow modes is largest).
        generator: seed or a :class:`SampleNoise` over the ``num_samples`` outputs (its ids key the noise).

    Returns:
        ``(x0 of shape (num_samples, *event_shape), NFE per output sample = (steps + 1) * particles)``.
    """
    particles = int(particles)
    if particles < 1:
        raise ValueError(f"particles must be a positive integer; got {particles}")
    op = obs.operator
    out = as_sample_noise(generator, int(num_samples))
    g, p = out.batch_size, particles
    ids = (out.sample_ids[:, None] * p + torch.arange(p)[None]).reshape(-1)
    pn = SampleNoise(out.seed, ids)  # particle noise
    rn = SampleNoise(out.seed ^ _RESAMPLE_SALT, out.sample_ids)  # resampling uniforms, per output
    shape = tuple(op.in_shape)
    y = obs.y.to(dtype=dtype, device=device)
    if y.shape[0] == 1:
        y = y.expand(g, *y.shape[1:])
    elif y.shape[0] != g:
        raise ValueError(f"y holds {y.shape[0]} observations; need 1 or num_samples = {g}")
    y = y.repeat_interleave(p, dim=0)  # (G P, ...)
    s2y = obs.sigma_y**2
    from solvers import time_grid

    times = time_grid(sde, int(steps), schedule).tolist()

    def coef(t):
        tt = torch.tensor(float(t), dtype=torch.float64)
        return float(sde.alpha(tt)), float(sde.std(tt))

    x = sde.prior_std * pn.randn(shape, 0, dtype=dtype, device=device)
    nfe = 0
    with torch.no_grad():
        for i in range(steps):
            t, s = times[i], times[i + 1]
            eps = model(x, _times(t, x))
            nfe += 1
            x0 = eps_to_x0(x, eps, sde, _times(t, x))
            mean, var = ancestral_moments(sde, x, x0, t, s)
            a_s, std_s = coef(s)
            gram_a, gram_b = var + std_s**2, a_s**2 * s2y
            resid = a_s * y - op.forward(mean)
            logw = _log_gauss(obs, resid, gram_a, gram_b)  # log Z_i(x)
            if i > 0:
                a_t, std_t = coef(t)
                logw = logw - _log_gauss(obs, a_t * y - op.forward(x), std_t**2, a_t**2 * s2y)  # - log g_i(x)
            if p > 1:
                u = torch.special.ndtr(rn.randn((1,), i, dtype=torch.float64))[:, 0]
                anc = systematic_resample(logw.reshape(g, p).double(), u.to(logw.device))
                flat = (anc + torch.arange(g, device=anc.device)[:, None] * p).reshape(-1)
                mean = mean[flat]
            # Matheron's rule: x~ ~ N(mean, var I), e ~ N(0, std_s^2 A A^T + a_s^2 s2y I)
            xt = mean + var**0.5 * pn.randn(shape, 1 + 3 * i, dtype=dtype, device=device)
            e = std_s * op.forward(pn.randn(shape, 2 + 3 * i, dtype=dtype, device=device))
            if s2y > 0:
                e = e + a_s * obs.sigma_y * pn.randn(tuple(op.out_shape), 3 + 3 * i, dtype=dtype, device=device)
            x = xt + var * op.adjoint(op.solve(a_s * y - op.forward(xt) - e, gram_a, gram_b))
        t = times[-1]
        x = eps_to_x0(x, model(x, _times(t, x)), sde, _times(t, x))
        nfe += 1
    # every particle now carries equal weight: output sample i takes one of its particles at random
    pick = torch.floor(torch.special.ndtr(rn.randn((1,), steps, dtype=torch.float64))[:, 0] * p).long().clamp(max=p - 1)
    x = x.reshape(g, p, *shape)[torch.arange(g), pick.to(x.device)]
    return x, nfe * p


__all__ = ["smc_sample", "systematic_resample"]
