"""Reverse-SDE samplers of the predictor-corrector family: ancestral, Euler-Maruyama, reverse
diffusion, predictor-corrector and annealed Langevin (one step loop, five registry records).

Each walks a time grid ``T = t_0 > t_1 > ... > t_N = t_min`` (:func:`solvers.base.time_grid`). Each
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

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from scoresde._tensor import append_dims
from scoresde.sde import SDE

from .base import Run
from .registry import SCHEDULES, GridOptions, Sampler, knob

Tensor = torch.Tensor

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")

# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
class StepGrid:
    """The time grid and every per-step scalar a sampler needs, in float64 (computed once).

    Index ``i`` runs over grid times; step ``i`` goes from ``t[i]`` to ``t[i + 1]`` and uses the
    forward kernel ``x_{t[i]} | x_{t[i+1]} ~ N(r[i] x, q[i]^2)``. The same values are kept as Python
    float lists (``tl``, ``alphal``, ...) so the step loop reads scalars without touching tensors.
    """

    def __init__(self, sde: SDE, t: Tensor):
        self.t = t  # (N + 1,) decreasing
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


def tweedie(x: Tensor, eps: Tensor, alpha: float, std: float) -> Tensor:
    """``x0 = (x - std eps) / alpha`` with host scalars (the grid's precomputed floats): two passes."""
    return torch.add(x, eps, alpha=-std).div_(alpha)


def finish_denoise(run: Run, grid: StepGrid, x: Tensor, denoise_final: bool) -> Tensor:
    """Tweedie denoising at ``t_min`` (one more evaluation), reported as step N at t = 0."""
    if not denoise_final:
        return x
    n = len(grid)
    eps = run.eps(x, grid.tl[n])
    x0 = tweedie(x, eps, grid.alphal[n], grid.stdl[n])
    return run.report(n, 0.0, x0, x0, t_prev=grid.tl[n])


# ---------------------------------------------------------------------------------------------
# Predictors: one step from t[i] to t[i + 1]. Each is linear in the state, the network output and
# fresh noise, x_{i+1} = A_i x_i + B_i eps(x_i, t_i) + C_i z, so each is given by its per-step
# coefficients (computed once, in float64, before the loop) and applied in three fused passes.
# ---------------------------------------------------------------------------------------------
Coeffs = List[Tuple[float, float, float]]


def _coeffs_ancestral(g: StepGrid) -> Coeffs:
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


def _coeffs_euler_maruyama(g: StepGrid) -> Coeffs:
    """``x_s = x_t - h [f x_t - g^2 score] + g sqrt(h) z`` with ``h = t - s`` (reverse SDE, eq. 6);
    ``g^2 score = -g^2 eps / s_t``, so ``A = 1 - h f``, ``B = -h g^2 / s_t``, ``C = g sqrt(h)``."""
    out = []
    for i in range(len(g)):
        h, f, gt, s_t = g.tl[i] - g.tl[i + 1], g.fl[i], g.gl[i], g.stdl[i]
        out.append((1.0 - h * f, -h * gt * gt / s_t, gt * math.sqrt(h)))
    return out


def _coeffs_reverse_diffusion(g: StepGrid) -> Coeffs:
    """Reverse diffusion (Song et al. 2021, eq. 46) on the exact discretisation of the forward SDE.

    Forward: ``x_t = x_s + f_i(x_s) + G_i z`` with ``f_i(x) = (r - 1) x``, ``G_i = q`` (from
    ``transition(s, t)``). Reverse: ``x_s = x_t - f_i(x_t) + G_i^2 score(x_t, t) + G_i z
    = (2 - r) x_t + q^2 score + q z``, i.e. ``A = 2 - r``, ``B = -q^2 / s_t``, ``C = q``. DDPM's
    ``r = sqrt(1 - beta)``, ``q^2 = beta`` and SMLD's ``r = 1``, ``q^2 = sigma_t^2 - sigma_s^2`` are
    the two familiar cases.
    """
    return [(2.0 - g.rl[i], -g.ql[i] ** 2 / g.stdl[i], g.ql[i]) for i in range(len(g))]


_COEFFS: Dict[str, Callable[[StepGrid], Coeffs]] = {
    "ancestral": _coeffs_ancestral,
    "euler_maruyama": _coeffs_euler_maruyama,
    "reverse_diffusion": _coeffs_reverse_diffusion,
}


def _predict(run: Run, g: StepGrid, x: Tensor, i: int, abc: Tuple[float, float, float], stream: int) -> Tuple[Tensor, Optional[Tensor]]:
    """``x_{i+1} = A x + B eps + C z`` (new tensor; ``x`` and the model's output are not modified) and,
    only when a callback will read it, the denoised estimate ``(x - s_t eps) / a_t`` at ``t[i]``."""
    a, b, c = abc
    eps = run.eps(x, g.tl[i])
    x_new = run.noise(x, stream).mul_(c).add_(x, alpha=a).add_(eps, alpha=b)
    x0 = tweedie(x, eps, g.alphal[i], g.stdl[i]) if run.wants_denoised else None
    return x_new, x0


# ---------------------------------------------------------------------------------------------
# Correctors: Langevin steps at a fixed time s = t[i + 1] targeting p_s.
# ---------------------------------------------------------------------------------------------
def _correct(
    run: Run, g: StepGrid, x: Tensor, i: int, kind: str, snr: float, stream: int
) -> Tuple[Tensor, Optional[Tensor]]:
    """One Langevin step ``x <- x + e score + sqrt(2 e) z`` at ``s = t[i + 1]``; ``alpha_i = r_i^2``.

    ``langevin`` (Song et al. 2021, Algorithms 2/3): ``e = min(2 alpha_i (snr ||z|| / ||score||)^2,
    std_s^2)`` with per-sample norms over all non-batch dims; the cap (never reached on images) keeps a
    near-zero score, or a zero network output, from making the step infinite. ``ald`` (annealed Langevin dynamics, Song &
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
        # capped at std_s^2: -hess log p_s <= I / std_s^2 (Tweedie), so Langevin is stable for e < 2 std_s^2
        e = (2.0 * alpha_i * (snr * _norm(z) / score_norm) ** 2).clamp_(max=s_s * s_s)  # (B,)
        x_new = z.mul_(append_dims(torch.sqrt(2.0 * e), x.ndim)).add_(x).addcmul_(eps, append_dims(-e / s_s, x.ndim))
    else:  # ald
        e = 2.0 * alpha_i * (snr * s_s) ** 2
        x_new = z.mul_(math.sqrt(2.0 * e)).add_(x).add_(eps, alpha=-e / s_s)
    x0 = tweedie(x, eps, a_s, s_s) if run.wants_denoised else None
    return x_new, x0


# ---------------------------------------------------------------------------------------------
# Options and the one loop of the family
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictorOptions(GridOptions):
    """Options of the one-evaluation predictors (``ancestral``, ``euler_maruyama``, ``reverse_diffusion``)."""


@dataclass(frozen=True)
class CorrectorOptions(GridOptions):
    """Options of the Langevin corrector: the step rule, its ``snr`` and the steps per level."""

    corrector: str = knob("ald", "Langevin step rule: 'ald' e = 2 r (snr std)^2; 'langevin' the paper's "
                          "e = 2 r (snr |z| / |score|)^2, capped at std^2", ("langevin", "ald"))
    snr: float = knob(0.16, "signal-to-noise ratio of the corrector's step")
    corrector_steps: int = knob(1, "corrector steps at each time")

    def check(self) -> None:
        super().check()
        if self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be a non-negative integer; got {self.corrector_steps!r}")
        if self.corrector != "none" and not self.snr > 0:
            raise ValueError(f"snr must be positive; got {self.snr!r}")


@dataclass(frozen=True)
class LangevinOptions(CorrectorOptions):
    """Options of :func:`langevin`: more, larger corrector steps on a log-SNR grid by default (the
    corrector alone has no predictor to carry the law between levels)."""

    schedule: str = knob("logsnr", "time grid: a name in solvers.SCHEDULES", tuple(SCHEDULES))
    snr: float = knob(0.3, "signal-to-noise ratio of the corrector's step")
    corrector_steps: int = knob(2, "corrector steps at each time")


@dataclass(frozen=True)
class PCOptions(CorrectorOptions):
    """Options of :func:`pc`: a predictor followed by corrector steps at each time."""

    predictor: str = knob("reverse_diffusion", "predictor step", PREDICTORS)
    corrector: str = knob("ald", "corrector step rule: 'ald' e = 2 r (snr std)^2; 'langevin' the paper's "
                          "e = 2 r (snr |z| / |score|)^2, capped at std^2; 'none': predictor only", CORRECTORS)

    def check(self) -> None:
        super().check()
        if self.predictor == "none" and (self.corrector == "none" or self.corrector_steps == 0):
            raise ValueError("with predictor 'none' the corrector must be 'langevin' or 'ald' with corrector_steps >= 1")


def _pc_loop(run: Run, steps: int, opts: GridOptions, predictor: str, corrector: str, n_corr: int, snr: float,
             name: str) -> Tensor:
    """The family's step loop: predictor from ``t_i`` to ``t_{i+1}``, then ``n_corr`` corrector steps
    at ``t_{i+1}``, then :meth:`Run.report` (guard, callback, state hook)."""
    n_corr = n_corr if corrector != "none" else 0
    grid = StepGrid(run.sde, opts.grid(run.sde, steps))
    first = 0 if predictor == "none" else 1  # the predictor's stream, if any, comes first
    per_step = first + n_corr  # noise streams used per step
    run.streams = len(grid) * per_step  # streams 0 .. N * per_step - 1, each once, in order
    coeffs = _COEFFS[predictor](grid) if predictor != "none" else None
    x = run.x
    for i in run.steps(len(grid), desc=name):
        x0 = None
        if coeffs is not None:
            x, x0 = _predict(run, grid, x, i, coeffs[i], i * per_step)
        for j in range(n_corr):
            x, x0 = _correct(run, grid, x, i, corrector, snr, i * per_step + first + j)
        x = run.report(i, grid.tl[i + 1], x, x0, t_prev=grid.tl[i])
    return finish_denoise(run, grid, x, opts.denoise_final)


# ---------------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------------
def ancestral(run: Run, steps: int, opts: PredictorOptions) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) written through the exact forward kernel.

    ``x_s ~ q(x_s | x_t, x0_hat)``, ``x0_hat = (x_t - std_t eps) / alpha_t``: the Gaussian posterior
    of ``x_s ~ N(alpha_s x0, std_s^2)``, ``x_t | x_s ~ N(r x_s, q^2)``, with mean
    ``(alpha_s q^2 x0_hat + r std_s^2 x_t) / std_t^2`` and std ``std_s q / std_t``. For VP with
    DDPM's grid this is DDPM's step; for VE (``r = 1``) it is SMLD's ancestral step
    ``x_s = x_t + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2) z``.

    ``x0_hat`` is not clipped (DDPM clips it to [-1, 1] for images; wrap the model with a clipping
    adapter if wanted). The plug-in ``x0_hat`` ignores the posterior spread of ``x0``, so the law is
    too narrow at few steps (an ``O(1/N)`` variance bias; see docs/solvers.md). One network
    evaluation per step.
    """
    return _pc_loop(run, steps, opts, "ancestral", "none", 0, 0.0, "ancestral")


def euler_maruyama(run: Run, steps: int, opts: PredictorOptions) -> Tensor:
    """Euler-Maruyama on the reverse SDE ``dx = [f x - g^2 score] dt + g dW_bar`` (Song et al. 2021, eq. 6).

    ``x_s = x_t - h (f(t) x_t - g(t)^2 score(x_t, t)) + g(t) sqrt(h) z``, ``h = t - s``. One network
    evaluation per step.
    """
    return _pc_loop(run, steps, opts, "euler_maruyama", "none", 0, 0.0, "euler_maruyama")


def reverse_diffusion(run: Run, steps: int, opts: PredictorOptions) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, eq. 46) from the exact forward discretisation.

    With ``(r, q) = sde.transition(s, t)`` the forward step is ``x_t = x_s + (r - 1) x_s + q z``,
    so the reverse step is ``x_s = (2 - r) x_t + q^2 score(x_t, t) + q z``. One network evaluation
    per step.
    """
    return _pc_loop(run, steps, opts, "reverse_diffusion", "none", 0, 0.0, "reverse_diffusion")


def pc(run: Run, steps: int, opts: PCOptions) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 3).

    Each step runs the predictor from ``t_i`` to ``t_{i+1}`` (``euler_maruyama``,
    ``reverse_diffusion``, ``ancestral`` or ``none``), then ``corrector_steps`` corrector steps at
    ``t_{i+1}`` (``ald``, the default: ``e = 2 alpha_i (snr std)^2``; ``langevin``, the paper's
    rule: ``e = 2 alpha_i (snr ||z|| / ||score||)^2``, norms per sample over all non-batch dims,
    capped at ``std^2``; or ``none``), with ``alpha_i = r_i^2`` from ``transition`` (``1 - beta_i``
    for VP-type SDEs, 1 for VE). This is the papers' order; score_sde_pytorch runs the corrector
    first at each time, which differs only by a corrector at ``T`` instead of one at ``t_min``.
    ``steps * (1 + corrector_steps)`` NFE.

    Why ``ald`` by default: the paper's per-sample rule depends on the state, ``e ~
    1/||score(x)||^2``, and a Langevin chain with a state-dependent step ``e(x)`` leaves ``p(x) /
    e(x)`` invariant, not ``p`` (Fokker-Planck with ``rho = p / e``): for Gaussian data the radius
    law moves from chi^2_D to chi^2_{D+2}, a variance bias of order ``1/D`` whatever ``snr``, and in
    1-2 dimensions ``||score||`` is often near 0 and single steps explode (the cap bounds them but
    not the bias). score_sde averages the norms over the batch, which hides this but ties each
    sample to its batch. ``ald``'s step is the same for every sample and independent of the network
    output, so it targets ``p_s`` (up to the discretisation bias of one Langevin step) at any data
    dimension, and a zero network output is harmless. Measurements: docs/pc_defaults.md.
    """
    return _pc_loop(run, steps, opts, opts.predictor, opts.corrector, opts.corrector_steps, opts.snr, "pc")


def langevin(run: Run, steps: int, opts: LangevinOptions) -> Tensor:
    """Annealed Langevin dynamics over the time grid: the corrector alone (Song & Ermon 2019).

    At each ``t_1, ..., t_N`` run ``corrector_steps`` Langevin steps targeting ``p_t``;
    ``corrector="ald"`` uses ``e = 2 alpha_i (snr std_t)^2``, ``corrector="langevin"`` the capped snr
    rule of :func:`pc`. Defaults: ``ald`` with ``snr = 0.3``, two steps per level, on the log-SNR
    grid (on a uniform VP grid only the last few percent of the levels are at low noise, too few for
    the corrector alone to contract the law; see docs/pc_defaults.md). ``steps * corrector_steps``
    network evaluations (+1 to denoise).
    """
    if opts.corrector_steps < 1:
        raise ValueError("the langevin sampler needs corrector_steps >= 1")
    return _pc_loop(run, steps, opts, "none", opts.corrector, opts.corrector_steps, opts.snr, "langevin")


_NEEDS = ("alpha", "std", "sde", "transition")
RECORDS = (
    Sampler("ancestral", ancestral, PredictorOptions, 1000, True, _NEEDS,
            summary="DDPM ancestral sampling through the exact forward kernel", nfe="steps (+1 with denoise_final)"),
    Sampler("euler_maruyama", euler_maruyama, PredictorOptions, 1000, True, _NEEDS,
            summary="Euler-Maruyama on the reverse SDE", nfe="steps (+1 with denoise_final)"),
    Sampler("reverse_diffusion", reverse_diffusion, PredictorOptions, 1000, True, _NEEDS,
            summary="reverse-diffusion predictor (Song et al. 2021, eq. 46)", nfe="steps (+1 with denoise_final)"),
    Sampler("pc", pc, PCOptions, 1000, True, _NEEDS,
            summary="predictor-corrector (Song et al. 2021, Algorithms 2-3)",
            nfe="steps * (1 + corrector_steps) (+1 with denoise_final)"),
    Sampler("langevin", langevin, LangevinOptions, 1000, True, _NEEDS,
            summary="annealed Langevin dynamics (Song & Ermon 2019)", nfe="steps * corrector_steps (+1 with denoise_final)"),
)
