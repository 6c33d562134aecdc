"""Shared problems, reference solutions and metrics for the sampler experiments and benchmarks.

Every experiment here runs on exact Gaussian mixtures (``scoresde.GaussianMixture``), so the score,
the denoiser and the probability-flow ODE are known in closed form and no network error blurs the
comparison. Conventions (identical for our samplers and the peers):

* **SDE.** ``VPSDE(0.1, 20)``: the continuous limit of DDPM's linear betas 1e-4 .. 0.02 (N = 1000).
* **Sigma space.** ``sigma = std/alpha`` and ``y = x_t / alpha(t)`` (EDM / k-diffusion variables).
  The probability-flow ODE there is ``dy/dsigma = eps(alpha y, t(sigma)) = (y - D(y, sigma)) / sigma``
  (Karras et al. 2022, eq. 4 with s = 1), smooth down to ``sigma = 0`` for mixtures of Gaussians
  with positive widths (eps -> 0 there), so "the ODE solution at sigma = 0" is well defined.
* **Starting noise.** One standard-normal draw ``z`` per problem. A solver that starts at noise
  level ``sigma_0`` in VP coordinates starts from ``x = z`` (``y = z sqrt(1 + sigma_0^2)``);
  k-diffusion and diffusers' sigma-space schedulers start from the same ``y``.
* **Endpoint.** Each solver ends at some ``sigma_end`` (0 when its last step jumps to the clean
  data, as k-diffusion and diffusers do; ``sigma(t_min)`` when it stops at ``t_min``). Its reference
  is the exact ODE solution from its own start ``(sigma_0, y_0)`` to its own ``sigma_end``,
  integrated adaptively in float64 (:func:`reference_solution`). Errors are compared in ``y``.
* **RMS endpoint error.** Root-mean-square over samples AND coordinates,
  ``sqrt(mean_{i,j} (y_ij - y_ref,ij)^2)`` (as ``solvers.reference.rms``); the per-sample
  Euclidean norm's RMS is ``sqrt(dim)`` times larger.
* **MMD.** Gaussian kernel ``k(x, x') = exp(-|x - x'|^2 / (2 h^2))``; the mixture terms are
  Gaussian convolutions, computed exactly (:func:`mmd2`), so only the sample terms carry noise; the
  estimator's standard deviation comes from the jackknife over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from scoresde import GaussianMixture, VPSDE
from scoresde._tensor import append_dims, unchecked
from scoresde.sde import SDE

DTYPE = torch.float64

#: The SDE every experiment uses: continuous limit of DDPM's linear schedule (1e-4 .. 0.02, N = 1000).
def make_sde() -> VPSDE:
    return VPSDE(beta_min=0.1, beta_max=20.0)


def _ring_narrow() -> GaussianMixture:
    """Five sharp, unequal components on a radius-3 ring (widths 0.05 .. 0.15): stiffer near sigma -> 0."""
    return GaussianMixture.ring(k=5, radius=3.0, std=0.1, unequal=True)


def _ring_wide() -> GaussianMixture:
    """Twelve unequal components on a radius-6 ring (widths 0.125 .. 0.375): farther from the origin."""
    return GaussianMixture.ring(k=12, radius=6.0, std=0.25, unequal=True)


#: name -> factory of the exact data distribution.
PROBLEMS: Dict[str, Callable[[], GaussianMixture]] = {
    "ring8": GaussianMixture.ring,  # 8 components, radius 4, weights 1..8 (normalised), widths 0.15 .. 0.45
    "ring5_narrow": _ring_narrow,
    "ring12_wide": _ring_wide,
    "rand16_s0": lambda: GaussianMixture.random(16, seed=0),
    "rand16_s1": lambda: GaussianMixture.random(16, seed=1),
    "rand16_s2": lambda: GaussianMixture.random(16, seed=2),
}


def _grid25() -> GaussianMixture:
    """25 components on a 5 x 5 square grid of spacing 2 (centred), random widths 0.08 .. 0.33 and weights."""
    g = torch.Generator().manual_seed(11)
    xs = torch.arange(5, dtype=torch.float64) * 2.0 - 4.0
    means = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    stds = 0.08 + 0.25 * torch.rand(25, generator=g, dtype=torch.float64)
    w = torch.rand(25, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture(means, stds, w / w.sum())


#: Held-out mixtures (not used to choose any default): another geometry, more components, higher
#: dimension, to check that a sampler's advantage is not tuned to ``PROBLEMS``.
EXTRA_PROBLEMS: Dict[str, Callable[[], GaussianMixture]] = {
    "ring16": lambda: GaussianMixture.ring(k=16, radius=5.0, std=0.2, unequal=True),  # widths 0.1 .. 0.3, neighbours 1.95 apart
    "grid25": _grid25,
    "rand32": lambda: GaussianMixture.random(32, k=12, seed=3, scale=1.5, std_range=(0.1, 0.5)),
    "rand64": lambda: GaussianMixture.random(64, k=16, seed=4, scale=0.8, std_range=(0.15, 0.5)),
}

def _spiral10() -> GaussianMixture:
    """Ten components along a spiral (radius 1 .. 5.05, 1.1 rad apart), widths 0.05 .. 0.3, random weights."""
    g = torch.Generator().manual_seed(21)
    k = torch.arange(10, dtype=torch.float64)
    r, th = 1.0 + 0.45 * k, 1.1 * k
    means = torch.stack([r * torch.cos(th), r * torch.sin(th)], 1)
    stds = 0.05 + 0.25 * torch.rand(10, generator=g, dtype=torch.float64)
    w = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    return GaussianMixture(means, stds, w / w.sum())


def _ring6_far() -> GaussianMixture:
    """A radius-2 ring of six narrow components (width 0.15) and one wide, heavy component far out at (9, 0)."""
    ang = torch.arange(6, dtype=torch.float64) * (math.pi / 3)
    means = torch.cat([2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1), torch.tensor([[9.0, 0.0]], dtype=torch.float64)])
    stds = torch.tensor([0.15] * 6 + [0.5], dtype=torch.float64)
    w = torch.tensor([0.1, 0.05, 0.15, 0.08, 0.12, 0.1, 0.4], dtype=torch.float64)
    return GaussianMixture(means, stds, w / w.sum())


#: Fresh mixtures, added in the fifth session after every default (grid, knots, coefficients,
#: pilot) had been fixed, and used only to check them: a spiral, a ring with a far outlier, and
#: many narrow components in 8-D.
FRESH_PROBLEMS: Dict[str, Callable[[], GaussianMixture]] = {
    "spiral10": _spiral10,
    "ring6_far": _ring6_far,
    "rand8_k24": lambda: GaussianMixture.random(8, k=24, seed=5, scale=1.2, std_range=(0.05, 0.25)),
}

#: every problem by name (``PROBLEMS`` first).
ALL_PROBLEMS: Dict[str, Callable[[], GaussianMixture]] = {**PROBLEMS, **EXTRA_PROBLEMS, **FRESH_PROBLEMS}

#: a small subset for --quick smoke runs
QUICK_PROBLEMS = ("ring8", "rand16_s0")


def starting_noise(dim: int, n: int, seed: int = 0) -> torch.Tensor:
    """The standard-normal draw ``z`` (n, dim) shared by every solver on a problem."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=DTYPE)


# ---------------------------------------------------------------------------------------------
# The exact model in sigma space
# ---------------------------------------------------------------------------------------------
def sigma_to_t(sde: SDE, sigma: torch.Tensor) -> torch.Tensor:
    """``t(sigma)``; exact inverse of ``sde.sigma`` (may exceed T slightly for diffusers' sigma 157)."""
    return sde.t_from_sigma(sigma)


def eps_sigma(model: Callable, sde: SDE, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``eps`` at the sigma-space point ``y`` and per-sample ``sigma`` (B,), from the VP eps-model.

    ``x_t = alpha y`` with ``alpha = 1/sqrt(1 + sigma^2)`` and ``t = t(sigma)``. Range checks are off
    because diffusers' largest sigma (157) lies slightly beyond ``sigma(T) = 152`` (``t = 1.003``);
    the VP formulas hold there unchanged.
    """
    sigma = sigma.to(y.dtype).expand(y.shape[0]) if sigma.ndim == 0 else sigma.to(y.dtype)
    alpha = torch.rsqrt(1.0 + sigma * sigma)
    with unchecked():
        t = sigma_to_t(sde, sigma)
        return model(append_dims(alpha, y.ndim) * y, t)


def denoiser(model: Callable, sde: SDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """k-diffusion's denoiser ``D(y, sigma) = y - sigma eps(alpha y, t(sigma))`` from the VP eps-model."""

    def D(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(y.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(y.shape[0])
        return y - append_dims(sigma, y.ndim) * eps_sigma(model, sde, y, sigma)

    return D


# ---------------------------------------------------------------------------------------------
# Reference solution of the probability-flow ODE
# ---------------------------------------------------------------------------------------------
RHO = 7.0  # integrate in r = sigma^(1/rho): smooth down to sigma = 0 and evenly resolved in log-sigma


def reference_solution(
    model: Callable,
    sde: SDE,
    y0: torch.Tensor,
    sigma_start: float,
    sigma_end: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "dopri8",
) -> torch.Tensor:
    """Exact PF-ODE solution (to ``rtol``) from ``(sigma_start, y0)`` to ``sigma_end`` (may be 0), in ``y``.

    ``sigma = r^rho``, ``dy/dr = rho r^(rho-1) eps(alpha y, t(sigma))``: with ``rho = 7`` the right
    side is smooth on ``[0, sigma_max^(1/7)]`` (eps ~ sigma near 0). float64, adaptive
    Dormand-Prince 8(5,3) from torchdiffeq.
    """
    from torchdiffeq import odeint

    if not sigma_start > sigma_end >= 0:
        raise ValueError(f"need sigma_start > sigma_end >= 0; got {sigma_start}, {sigma_end}")
    y0 = y0.to(DTYPE)
    b = y0.shape[0]

    def rhs(r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The adaptive solver may probe just past r = 0; eps(y, sigma) = sigma f(sigma^2) is odd in
        # sigma, so continue it analytically there: eps(y, -s) = -eps(y, s).
        sigma = (r.abs() ** RHO).expand(b)
        return RHO * r ** (RHO - 1) * torch.sign(r) * eps_sigma(model, sde, y, sigma)

    r = torch.tensor([sigma_start ** (1 / RHO), sigma_end ** (1 / RHO)], dtype=DTYPE)
    return odeint(rhs, y0, r, rtol=rtol, atol=atol, method=method)[-1]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all samples and coordinates (per-coordinate RMS)."""
    return float((a.to(DTYPE) - b.to(DTYPE)).pow(2).mean().sqrt())


def rms_with_std(a: torch.Tensor, b: torch.Tensor, resamples: int = 200, seed: int = 0) -> Tuple[float, float]:
    """Per-coordinate RMS and its bootstrap standard deviation over samples (``resamples`` draws).

    The per-sample squared errors are heavy-tailed on separated mixtures (a few trajectories switch
    components), so the RMS of n samples carries sampling noise worth stating.
    """
    sq = (a.to(DTYPE) - b.to(DTYPE)).reshape(a.shape[0], -1).pow(2).mean(1)  # (n,)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, sq.numel(), (resamples, sq.numel()), generator=g)
    boot = sq[idx].mean(1).sqrt()
    return float(sq.mean().sqrt()), float(boot.std())


def median_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over samples of the per-sample Euclidean error ``|a_i - b_i|``.

    On well-separated mixtures a few trajectories start near a boundary between basins and, under a
    coarse solver, end in the neighbouring component; they dominate the RMS (error ~ the distance
    between modes, for a fraction of samples ~ the step error), which then falls only like the
    square root of the solver's order. The median follows the typical trajectory and shows the order.
    """
    d = (a.to(DTYPE) - b.to(DTYPE)).reshape(a.shape[0], -1)
    return float(d.norm(dim=1).median())


# ---------------------------------------------------------------------------------------------
# MMD to the exact mixture
# ---------------------------------------------------------------------------------------------
def default_bandwidth(mixture: GaussianMixture) -> float:
    """``h^2 = dim * sum_k w_k s_k^2``: two draws of one component are ~ e^-1 apart in the kernel."""
    return math.sqrt(mixture.dim * float((mixture.weights * mixture.stds**2).sum()))


def _gauss_conv(sq_dist: torch.Tensor, var: torch.Tensor, h2: float, dim: int) -> torch.Tensor:
    """``E k`` for a Gaussian kernel against ``N(., var I)``: ``(h^2/(h^2+var))^(d/2) exp(-d^2 / (2 (h^2+var)))``."""
    return (h2 / (h2 + var)) ** (dim / 2) * torch.exp(-0.5 * sq_dist / (h2 + var))


@dataclass
class MMDResult:
    mmd2: float  # unbiased estimate of MMD^2 (can be slightly negative)
    std: float  # jackknife standard deviation of that estimate

    @property
    def mmd(self) -> float:
        return math.sqrt(max(self.mmd2, 0.0))


def mmd2(x: torch.Tensor, mixture: GaussianMixture, bandwidth: Optional[float] = None) -> MMDResult:
    """Unbiased ``MMD^2(samples, mixture)`` with the mixture terms in closed form.

    ``MMD^2 = E_pp k - 2 mean_i g(x_i) + 1/(n(n-1)) sum_{i != j} k(x_i, x_j)`` with
    ``g(x) = E_{x'~p} k(x, x') = sum_k w_k (h^2/(h^2+s_k^2))^(d/2) exp(-|x-mu_k|^2 / (2 (h^2+s_k^2)))``
    and ``E_pp k = sum_{k,l} w_k w_l (h^2/(h^2+s_k^2+s_l^2))^(d/2) exp(-|mu_k-mu_l|^2/(2(h^2+s_k^2+s_l^2)))``.
    The standard deviation is the jackknife's (leave-one-sample-out), computed in O(n^2).
    """
    h = default_bandwidth(mixture) if bandwidth is None else float(bandwidth)
    h2, d = h * h, mixture.dim
    x = x.to(DTYPE).reshape(x.shape[0], -1)
    n = x.shape[0]
    mu = mixture.means.reshape(mixture.num_components, -1)
    s2, w = mixture.stds**2, mixture.weights
    e_pp = float(w @ _gauss_conv(torch.cdist(mu, mu).pow(2), s2[:, None] + s2[None, :], h2, d) @ w)
    g = _gauss_conv(torch.cdist(x, mu).pow(2), s2[None, :], h2, d) @ w  # (n,)
    kxx = torch.exp(-0.5 * torch.cdist(x, x).pow(2) / h2)
    kxx.fill_diagonal_(0.0)
    row = kxx.sum(1)  # (n,) sum_{j != i} k(x_i, x_j)
    total, gsum = float(row.sum()), float(g.sum())
    est = e_pp - 2 * gsum / n + total / (n * (n - 1))
    # leave-one-out: drop sample i from both sample terms
    loo = e_pp - 2 * (gsum - g) / (n - 1) + (total - 2 * row) / ((n - 1) * (n - 2))
    jack_var = (n - 1) / n * float((loo - loo.mean()).pow(2).sum())
    return MMDResult(est, math.sqrt(jack_var))


# ---------------------------------------------------------------------------------------------
# Driving our samplers at a given NFE
# ---------------------------------------------------------------------------------------------
def nfe_of(name: str, sde: SDE, steps: int, dim: int = 2) -> int:
    """Network evaluations our sampler ``name`` spends at ``steps`` (counted on a 2-sample batch)."""
    import solvers

    model = GaussianMixture.gaussian(torch.zeros(dim), 1.0).eps_model(sde)
    x = torch.zeros(2, dim, dtype=DTYPE)
    return solvers.sample(model, sde, x_T=x, sampler=name, steps=steps, generator=0).nfe


_STEPS_CACHE: Dict[Tuple[str, int, str], Tuple[Optional[int], Optional[int]]] = {}


def steps_for_nfe(name: str, sde: SDE, target: int) -> Tuple[Optional[int], Optional[int]]:
    """Largest ``steps`` whose NFE is at most ``target`` (NFE is non-decreasing in steps): (steps, nfe).

    NFE is affine in ``steps`` for every fixed-step sampler (``a steps + b``): fit it from 1 and 2
    steps, then confirm around the prediction (and fall back to bisection if it is not affine).
    Returns ``(None, None)`` when even one step costs more than ``target``. Cached per sampler.
    """
    key = (name, int(target), repr(sde))
    if key in _STEPS_CACHE:
        return _STEPS_CACHE[key]
    cache: Dict[int, int] = {}

    def cost(s: int) -> int:
        if s not in cache:
            cache[s] = nfe_of(name, sde, s)
        return cache[s]

    result: Tuple[Optional[int], Optional[int]] = (None, None)
    if cost(1) <= target:
        a, b = cost(2) - cost(1), 2 * cost(1) - cost(2)
        guess = (target - b) // a if a > 0 else target
        if guess >= 1 and cost(guess) <= target and cost(guess + 1) > target:
            result = (guess, cost(guess))
        else:  # bisection on [1, 4 target]: cost(lo) <= target < cost(hi)
            lo, hi = 1, 4 * max(1, target)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
            result = (lo, cost(lo))
    _STEPS_CACHE[key] = result
    return result


def is_adaptive(name: str, sde: SDE) -> bool:
    """Whether the sampler chooses its own steps with its default options (``ode`` with an adaptive method)."""
    from scoresde.ode_methods import ODE_METHODS

    defaults = solvers_defaults(name)
    return name == "ode" and ODE_METHODS[defaults["method"]] or bool(defaults.get("adaptive", False))


def solvers_defaults(name: str) -> dict:
    import solvers

    return solvers.SAMPLERS[name].defaults()


def is_deterministic(name: str) -> bool:
    """Whether the sampler draws no noise after ``x_T`` with its default options (its output is then
    a function of ``x_T``, an ODE solution)."""
    import solvers

    return not solvers.SAMPLERS[name].stochastic
