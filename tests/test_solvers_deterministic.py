"""Deterministic samplers (DDIM, Heun, DPM-Solver++, PF-ODE) against exact mathematics.

Ground truths: (1) for Gaussian data N(mu, s^2 I) the probability-flow ODE map is linear and known,
x_T -> alpha_0 mu + sqrt(v_0 / v_T) (x_T - alpha_T mu) with v_t = alpha_t^2 s^2 + std_t^2, and Tweedie's
denoiser is D(x, t) = mu + alpha s^2 / v (x - alpha mu); (2) for Gaussian mixtures, a float64
dopri5 solution at rtol = atol = 1e-9 of the ODE as written in t (solvers.reference), which is
accurate to ~1e-8 (checked below against rtol 1e-11), far below every error asserted here.
"""

from __future__ import annotations

import math

import pytest
import torch

import solvers
from scoresde import CosineVPSDE, GaussianMixture, SubVPSDE, VESDE, VPSDE
from solvers import SamplingError
from solvers.reference import reference_solution, rms
from solvers.ode import METHODS as ODE_METHODS
from solvers.dpm_solver import exp_weights, phi

DETERMINISTIC = {name: solvers.SAMPLERS[name] for name in ("ddim", "ode", "heun", "dpm_solver")}
KNOBS = {name: record.defaults() for name, record in DETERMINISTIC.items()}

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "cosine": CosineVPSDE, "ve": lambda: VESDE(sigma_max=20.0)}
F64 = torch.float64


def gaussian_endpoint(sde, mu, s, x_T, denoise):
    """Exact PF-ODE endpoint at t_min (and Tweedie's x0 there) for data N(mu, s^2 I)."""
    tt = torch.tensor([sde.T, sde.t_min], dtype=F64)
    a, sd = sde.alpha(tt), sde.std(tt)
    v = a**2 * s**2 + sd**2
    x = a[1] * mu + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * mu)
    if denoise:
        x = mu + a[1] * s**2 / v[1] * (x - a[1] * mu)
    return x


def prior(sde, shape, seed=0):
    return sde.prior_std * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def test_phi_and_exponential_weights_integrate_polynomials_exactly():
    # phi_1(-h) = (1 - e^-h)/h exactly; the series and the recursion agree at the switch point.
    for h in (1e-3, 0.3, 0.7, 2.0):
        assert math.isclose(phi(1, h), -math.expm1(-h) / h, rel_tol=1e-13)
    for k in (1, 2, 3, 4):
        assert math.isclose(phi(k, 0.4999999), phi(k, 0.5000001), rel_tol=1e-6)
    # int_0^h e^{-(h-u)} u^2 du = 2 - e^{-h}(... ) computed by scipy-free quadrature (Simpson, 2001 pts).
    h = 0.8
    nodes = [0.0, -0.7, -1.9]  # in units of h, as the multistep predictor uses them
    w = exp_weights(nodes, h)
    u = torch.linspace(0, h, 2001, dtype=F64)
    for poly in (lambda x: 1 + 0 * x, lambda x: x, lambda x: 3 * x * x - x + 2):
        exact_vals = torch.exp(-(h - u)) * poly(u)
        simpson = (h / 6000) * (exact_vals[0] + exact_vals[-1] + 4 * exact_vals[1:-1:2].sum() + 2 * exact_vals[2:-1:2].sum())
        approx = sum(wj * float(poly(torch.tensor(r * h, dtype=F64))) for wj, r in zip(w, nodes))
        assert abs(approx - float(simpson)) < 1e-10


@pytest.mark.slow
def test_reference_is_tight():
    sde = VPSDE()
    gm = GaussianMixture.ring(k=4, radius=2.0, std=0.4)
    m = gm.eps_model(sde)
    x_T = prior(sde, (16, 2))
    assert rms(reference_solution(m, sde, x_T), reference_solution(m, sde, x_T, rtol=1e-11, atol=1e-11)) < 1e-6


# ------------------------------------------------------------------------------------------------
# Exact endpoints for Gaussian data, every sampler on every SDE
# ------------------------------------------------------------------------------------------------
# (sampler, steps, knobs, tolerance on the max abs endpoint error over 32 samples x 3 coords).
# Tolerances are ~3x the largest error measured over the four SDEs (sub-VP, whose sigma reaches
# 1e-4 and so spans the widest log-SNR range, is the worst); each is the discretisation error of the
# method's order at that step count (first/second order: ~1e-2 scale; third order and rk4: ~5e-3;
# dopri5 at rtol 1e-5: ~5e-5). A wrong scaling anywhere (alpha vs std, a missing sqrt) moves the
# endpoint by O(0.1 - 1). Accuracy as a function of steps is checked by the order tests below.
GAUSS_CASES = [
    ("ddim", 100, {}, 0.15),
    ("heun", 30, {}, 0.15),
    ("dpm_solver", 30, {"order": 2, "corrector": False, "schedule": "logsnr", "final_step": "dpm"}, 0.15),
    ("dpm_solver", 30, {"order": 3, "corrector": False, "schedule": "logsnr", "final_step": "dpm"}, 2e-2),
    ("dpm_solver", 30, {}, 2e-2),
    ("dpm_solver", 30, {"shift_eval": True}, 2e-2),
    ("dpm_solver", 30, {"interp": "window", "corrector_order": 3}, 2e-2),
    ("ode", None, {}, 1e-3),
    ("ode", 15, {"method": "rk4"}, 2e-2),
]


def _gauss_params():
    # Default run: every case on VP, and the default DPM-Solver++ and the adaptive ODE on every SDE;
    # the full grid is marked slow (CPU time on a shared machine).
    out = []
    for sde_name in SDES:
        for i, case in enumerate(GAUSS_CASES):
            fast = sde_name == "vp" or i in (4, 7)
            out.append(pytest.param(sde_name, *case, marks=() if fast else pytest.mark.slow))
    return out


@pytest.mark.parametrize("sde_name,sampler,steps,knobs,tol", _gauss_params())
def test_gaussian_endpoint_exact(sde_name, sampler, steps, knobs, tol):
    sde = SDES[sde_name]()
    mu, s = torch.tensor([0.7, -1.2, 0.3], dtype=F64), 0.8
    model = GaussianMixture.gaussian(mu, s).eps_model(sde)
    x_T = prior(sde, (32, 3))
    # denoise_final=True composes the ODE endpoint with Tweedie's formula (the endpoint alone is
    # covered by the order tests)
    out = DETERMINISTIC[sampler](model, sde, x_T, steps=steps, **knobs)
    exact = gaussian_endpoint(sde, mu, s, x_T, True)
    assert float((out - exact).abs().max()) < tol, (sampler, knobs)


# ------------------------------------------------------------------------------------------------
# Convergence order on a Gaussian mixture (nonlinear ODE) against the tight reference
# ------------------------------------------------------------------------------------------------
# (sampler, knobs, step counts, expected order). Step counts are in each method's asymptotic regime
# for this mixture; the fitted slope of log(error) vs log(steps) must lie within 0.35 of the order
# (the pre-asymptotic drift over these ranges is < 0.2 when measured; a lost order shifts it by >= 1).
_PLAIN = {"schedule": "logsnr", "corrector": False, "final_step": "dpm"}  # textbook DPM-Solver++
ORDER_CASES = [
    ("ddim", {"schedule": "logsnr"}, (20, 40, 80), 1.0),
    ("heun", {}, (20, 40, 80), 2.0),
    ("dpm_solver", {**_PLAIN, "order": 2}, (20, 40, 80), 2.0),
    ("dpm_solver", {**_PLAIN, "order": 3}, (20, 40, 80), 3.0),
    # the corrector adds one order (Adams-Moulton); the final first-order step is switched off
    # since its O(h^2) local error would set the asymptotic order.
    ("dpm_solver", {**_PLAIN, "order": 2, "corrector": True, "lower_order_final": False}, (20, 40, 80), 3.0),
    ("dpm_solver", {**_PLAIN, "order": 3, "corrector": True, "lower_order_final": False}, (20, 40, 80), 4.0),
    # moving the reused evaluation to the corrected state (shift_eval) must keep that order
    ("dpm_solver", {**_PLAIN, "order": 3, "corrector": True, "lower_order_final": False, "shift_eval": True}, (20, 40, 80), 4.0),
    ("ode", {"method": "midpoint", "variable": "t", "schedule": "uniform"}, (10, 20, 40), 2.0),
    pytest.param("ode", {"method": "rk4", "variable": "log_sigma"}, (10, 20, 40), 4.0, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def mixture_problem():
    sde = VPSDE()
    gm = GaussianMixture.ring(k=4, radius=2.0, std=0.5)
    model = gm.eps_model(sde)
    x_T = prior(sde, (16, 2), seed=3)
    return sde, model, x_T, reference_solution(model, sde, x_T, denoise=False)


@pytest.mark.parametrize("sampler,knobs,steps,order", ORDER_CASES)
def test_convergence_order(mixture_problem, sampler, knobs, steps, order):
    sde, model, x_T, ref = mixture_problem
    errs = [rms(DETERMINISTIC[sampler](model, sde, x_T, steps=n, denoise_final=False, **knobs), ref) for n in steps]
    logn = torch.log(torch.tensor(steps, dtype=F64))
    loge = torch.log(torch.tensor(errs, dtype=F64))
    slope = -float(((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())
    assert abs(slope - order) < 0.35, (sampler, knobs, errs, slope)


# ------------------------------------------------------------------------------------------------
# Distribution of the samples
# ------------------------------------------------------------------------------------------------
def test_samples_match_mixture_moments_and_weights():
    sde = VPSDE()
    gm = GaussianMixture.ring(k=4, radius=3.0, std=0.3)
    n = 3000
    res = solvers.sample(gm.eps_model(sde), sde, (n, 2), sampler="dpm_solver", steps=25, generator=5, dtype=F64)
    x = res.x
    # Mean: each coordinate's MC std is sqrt(var / n) ~ sqrt(4.6 / 3000) = 0.039; allow 4 std.
    var = torch.diagonal(gm.covariance())
    assert bool(((x.mean(0) - gm.mean()).abs() < 4 * torch.sqrt(var / n)).all())
    # Component frequencies (nearest mean; overlap is negligible at radius 3, std <= 0.3):
    # binomial std sqrt(w (1 - w) / n) <= 0.0091; allow 4 std.
    idx = torch.cdist(x, gm.means).argmin(1)
    freq = torch.bincount(idx, minlength=4).to(F64) / n
    assert bool(((freq - gm.weights).abs() < 4 * torch.sqrt(gm.weights * (1 - gm.weights) / n)).all())
    # Within-component spread: the radial-free residual variance per coordinate is s_k^2; its
    # relative MC error is sqrt(2 / n_k) <= 0.09 for n_k >= 250; allow 30%.
    for k in range(4):
        r = x[idx == k] - gm.means[k]
        assert abs(float(r.pow(2).mean()) / float(gm.stds[k]) ** 2 - 1) < 0.3


def test_ddim_eta_step_is_the_ddpm_posterior_and_reproducible():
    # One DDIM step t -> s with eta = 1 must draw from q(x_s | x_t, x_0 = D(x_t)), whose moments follow
    # from Bayes on x_t = a x_s + sqrt(b) z (a = alpha_t/alpha_s, b = std_t^2 - a^2 std_s^2):
    # precision 1/std_s^2 + a^2/b, mean var (alpha_s x0/std_s^2 + a x_t/b). With eta = 0.5 the
    # variance is eta^2 times that and the mean moves to keep the marginal (checked: mean only).
    sde = VPSDE()
    mu, s = torch.tensor([1.0, -2.0], dtype=F64), 0.5
    gm = GaussianMixture.gaussian(mu, s)
    model = gm.eps_model(sde)
    n = 4000
    x_t = prior(sde, (1, 2), seed=2).expand(n, 2).contiguous()
    t_min = 0.3  # the single step goes T -> 0.3
    out = DETERMINISTIC["ddim"](model, sde, x_t, steps=1, eta=1.0, t_min=t_min, denoise_final=False, generator=4)
    tt = torch.tensor([sde.T, t_min], dtype=F64)
    al, sd = sde.alpha(tt), sde.std(tt)
    a = al[0] / al[1]
    b = sd[0] ** 2 - a**2 * sd[1] ** 2
    x0 = gm.denoise(sde, x_t[:1], torch.tensor([sde.T], dtype=F64))[0]
    var = 1 / (1 / sd[1] ** 2 + a**2 / b)
    mean = var * (al[1] * x0 / sd[1] ** 2 + a * x_t[0] / b)
    # MC: mean error std sqrt(var/n), variance relative error std sqrt(2/n) = 0.022; allow 4-5 std.
    assert bool(((out.mean(0) - mean).abs() < 4 * torch.sqrt(var / n)).all())
    assert bool(((out.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n)).all())
    again = DETERMINISTIC["ddim"](model, sde, x_t, steps=1, eta=1.0, t_min=t_min, denoise_final=False, generator=4)
    assert torch.equal(out, again)
    # eta = 0: deterministic, no generator needed; eta = 0.5 is stochastic with the same mean.
    c = DETERMINISTIC["ddim"](model, sde, x_t[:4], steps=10)
    assert torch.equal(c, DETERMINISTIC["ddim"](model, sde, x_t[:4], steps=10))
    # DDIM's family (Song et al. 2021a, eq. 7): mean alpha_s x0 + sqrt(std_s^2 - c^2) (x_t - alpha_t x0)/std_t
    # with c^2 = eta^2 var; at eta = 1 it is the Bayes posterior above.
    half = DETERMINISTIC["ddim"](model, sde, x_t, steps=1, eta=0.5, t_min=t_min, denoise_final=False, generator=4)
    mean_half = al[1] * x0 + torch.sqrt(sd[1] ** 2 - 0.25 * var) * (x_t[0] - al[0] * x0) / sd[0]
    assert bool(((half.mean(0) - mean_half).abs() < 4 * torch.sqrt(0.25 * var / n)).all())
    assert bool(((half.var(0) / (0.25 * var) - 1).abs() < 5 * math.sqrt(2 / n)).all())


# ------------------------------------------------------------------------------------------------
# NFE, shapes, guards, validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sampler,steps,knobs,nfe",
    [
        ("ddim", 7, {}, 7),
        ("ddim", 7, {"eta": 0.5}, 7),
        ("heun", 6, {}, 11),
        ("dpm_solver", 1, {}, 1),
        ("dpm_solver", 2, {}, 2),
        ("dpm_solver", 10, {}, 10),
        ("dpm_solver", 10, {"corrector": True}, 10),
        ("dpm_solver", 10, {"shift_eval": True}, 10),
        ("dpm_solver", 20, {"order": 2}, 20),
        ("ode", 5, {"method": "rk4"}, 21),
        ("ode", 5, {"method": "rk4", "denoise_final": False}, 20),
        ("ode", 5, {"method": "euler"}, 6),
    ],
)
def test_nfe_exact(sampler, steps, knobs, nfe):
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    res = solvers.sample(model, sde, (4, 2), sampler=sampler, steps=steps, generator=0, **knobs)
    assert res.nfe == nfe


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_image_rank_matches_flat(sampler):
    sde = CosineVPSDE()
    gm_img = GaussianMixture(torch.randn(3, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64), [0.3, 0.5, 0.4])
    gm_flat = GaussianMixture(gm_img.means.reshape(3, 6), gm_img.stds, gm_img.weights)
    x_T = prior(sde, (5, 1, 2, 3))
    knobs = {"method": "rk4"} if sampler == "ode" else {}
    img = DETERMINISTIC[sampler](gm_img.eps_model(sde), sde, x_T, steps=8, **knobs)
    flat = DETERMINISTIC[sampler](gm_flat.eps_model(sde), sde, x_T.reshape(5, 6), steps=8, **knobs)
    assert img.shape == x_T.shape
    assert torch.allclose(img.reshape(5, 6), flat, atol=1e-12)


class _NaNAfter:
    """Exact eps until ``t`` drops below ``t_bad``, NaN afterwards."""

    def __init__(self, model, t_bad):
        self.model, self.t_bad = model, t_bad

    def __call__(self, x, t, **kw):
        eps = self.model(x, t)
        return eps * float("nan") if float(t[0]) < self.t_bad else eps


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
def test_nan_guard_names_step_and_time(sampler):
    sde = VPSDE()
    model = _NaNAfter(GaussianMixture.ring().eps_model(sde), 0.5)
    knobs = {"method": "rk4"} if sampler == "ode" else {}
    with pytest.raises(SamplingError, match=r"t = "):
        DETERMINISTIC[sampler](model, sde, prior(sde, (3, 2)), steps=10, **knobs)
    if sampler != "ode":  # stepwise samplers also name the step
        with pytest.raises(SamplingError, match=r"step \d+"):
            DETERMINISTIC[sampler](model, sde, prior(sde, (3, 2)), steps=10, **knobs)


def test_adaptive_ode_failure_is_a_sampling_error():
    sde = VPSDE()
    model = _NaNAfter(GaussianMixture.ring().eps_model(sde), 0.5)
    with pytest.raises(SamplingError):
        DETERMINISTIC["ode"](model, sde, prior(sde, (3, 2)))


def test_knob_validation():
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    x_T = prior(sde, (2, 2))
    for name in DETERMINISTIC:
        with pytest.raises(TypeError, match="unknown option"):
            DETERMINISTIC[name](model, sde, x_T, steps=3, not_a_knob=1)
        with pytest.raises(ValueError, match="schedule"):
            DETERMINISTIC[name](model, sde, x_T, steps=3, schedule="nope", method="rk4") if name == "ode" else DETERMINISTIC[
                name
            ](model, sde, x_T, steps=3, schedule="nope")
        with pytest.raises(ValueError, match="denoise_final"):
            DETERMINISTIC[name](model, sde, x_T, steps=3, denoise_final="yes")
        assert set(KNOBS[name]) >= {"t_min", "denoise_final", "schedule"}
    for bad in (-0.1, 1.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="eta"):
            DETERMINISTIC["ddim"](model, sde, x_T, steps=3, eta=bad)
    for bad in (0, 4, 2.0):
        with pytest.raises(ValueError, match="order"):
            DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=3, order=bad)
    for bad in ({"interp": "sigma"}, {"interp": "window", "schedule": "logsnr"}):
        with pytest.raises(ValueError, match="interp"):
            DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=3, **bad)
    for bad in (1, 5, 3.0, True):
        with pytest.raises(ValueError, match="corrector_order"):
            DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=3, corrector_order=bad)
    with pytest.raises(ValueError, match="shift_eval"):
        DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=3, shift_eval=1)
    with pytest.raises(ValueError, match="dopri5"):  # the message lists the available methods
        DETERMINISTIC["ode"](model, sde, x_T, steps=3, method="runge")
    for bad in (0.0, 2.0, -1e-5):
        with pytest.raises(ValueError, match="rtol"):
            DETERMINISTIC["ode"](model, sde, x_T, steps=3, rtol=bad)
    with pytest.raises(ValueError, match="steps"):
        DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=0)
    with pytest.raises(ValueError, match="t_min"):
        DETERMINISTIC["heun"](model, sde, x_T, steps=3, t_min=2.0)
    assert {"dopri5", "rk4", "euler", "bosh3"} <= set(ODE_METHODS)


class _NoLogSNRInverse(VPSDE):
    def _t_from_log_snr(self, lam):
        raise NotImplementedError


def test_missing_sde_capability_is_named():
    sde = _NoLogSNRInverse()
    model = GaussianMixture.ring().eps_model(VPSDE())
    x_T = prior(sde, (2, 2))
    with pytest.raises(ValueError, match="t_from_log_snr"):
        DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=4, schedule="logsnr")  # log-SNR grid needs the inverse
    with pytest.raises(ValueError, match="t_from_sigma"):
        DETERMINISTIC["dpm_solver"](model, sde, x_T, steps=4)  # the window grid is defined in sigma
    with pytest.raises(ValueError, match="t_from_sigma"):
        DETERMINISTIC["heun"](model, sde, x_T, steps=4)  # Karras grid needs sigma -> t
    # a time-uniform grid needs neither
    assert DETERMINISTIC["ddim"](model, sde, x_T, steps=4).shape == x_T.shape


def test_local_gaussian_final_step_is_exact_for_gaussian_data():
    # For data N(mu, s^2 I), D(y, sigma) = mu + s^2/(s^2 + sigma^2) (y - mu) in y = x/alpha, and the
    # PF-ODE from sigma_a to sigma_to maps y -> mu + sqrt((s^2 + sigma_to^2)/(s^2 + sigma_a^2)) (y - mu).
    # Two evaluations at arbitrary points determine (mu, s) per sample, so the step must be exact
    # (to rounding) whatever the evaluation points; s differs per sample to check no batch mixing.
    from solvers.dpm_solver import local_gaussian_step

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 1, 3, 3, generator=g, dtype=F64)
    s2 = torch.tensor([0.04, 0.25, 1.0, 9.0], dtype=F64).reshape(4, 1, 1, 1)

    def denoise(y, sig):
        return mu + s2 / (s2 + sig**2) * (y - mu)

    sa, sb, st = 0.3, 0.9, 0.01
    ya, yb = mu + torch.randn(mu.shape, generator=g, dtype=F64), mu + torch.randn(mu.shape, generator=g, dtype=F64)
    y = ya + 0.1 * torch.randn(mu.shape, generator=g, dtype=F64)
    y_to, x0 = local_gaussian_step(y, (denoise(ya, sa), ya, sa), (denoise(yb, sb), yb, sb), st)
    exact = mu + torch.sqrt((s2 + st**2) / (s2 + sa**2)) * (y - mu)
    assert torch.allclose(y_to, exact, atol=1e-10)
    assert torch.allclose(x0, denoise(exact, st), atol=1e-10)


def test_window_weights_integrate_polynomials_in_the_grid_variable_exactly():
    # w_j must reproduce int e^{-(lam1 - l)} P(v(l)) dl for every polynomial P of degree < k in
    # v = log((sigma + hi)/(sigma + lo)); checked against adaptive quadrature (scipy quad, ~1e-13) on
    # steps above, inside and below the window, with nodes spread as in the sampler. A polynomial of
    # degree k (one too many) must not be reproduced, so the check can fail.
    from scipy.integrate import quad

    from solvers.dpm_solver import window_weights

    lo, hi = 0.5, 10.0

    def v(lam):
        return math.log((math.exp(-lam) + hi) / (math.exp(-lam) + lo))

    for lam0, lam1 in ((-5.0, -3.1), (-0.5, 0.0), (1.6, 4.5)):
        h = lam1 - lam0
        nodes = [lam1, lam0, lam0 - 0.8 * h, lam0 - 1.9 * h]
        for k in (1, 2, 3, 4):
            w = window_weights(nodes[:k], lam0, lam1, lo, hi)
            for deg in (k - 1, k):
                coef = [0.3 * (j + 1) * (-1) ** j for j in range(deg + 1)]
                poly = lambda x: sum(c * x**j for j, c in enumerate(coef))
                exact = quad(lambda l: math.exp(-(lam1 - l)) * poly(v(l)), lam0, lam1, epsabs=1e-14, epsrel=1e-13)[0]
                got = sum(wj * poly(v(nj)) for wj, nj in zip(w, nodes[:k]))
                if deg < k:
                    assert abs(got - exact) < 1e-11 * max(1.0, abs(exact)), (lam0, k, got, exact)
                else:
                    assert abs(got - exact) > 1e-9, (lam0, k)


def test_shifted_denoise_is_exact_for_isotropic_gaussian_only():
    # For data N(mu, s^2 I), D(., sigma) is affine in y with slope s^2/(s^2 + sigma^2), and two
    # evaluations determine (mu, s^2) per sample, so moving D_a to another y must be exact to rounding.
    # Anisotropic data (stds 0.3 and 2 on the two halves) has no scalar slope: the shift must then err
    # visibly (by ~|c_true - c_fit| |y - y_a| ~ 0.1 here), so the first check is not vacuous.
    from solvers.dpm_solver import shifted_denoise

    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 6, generator=g, dtype=F64)
    for s2, exact in ((torch.tensor([0.04, 0.25, 1.0, 9.0], dtype=F64)[:, None], True),
                      (torch.tensor([0.09] * 3 + [4.0] * 3, dtype=F64)[None, :], False)):
        def denoise(y, sig):
            return mu + s2 / (s2 + sig**2) * (y - mu)

        sa, sb = 0.7, 1.5
        ya, yb = mu + torch.randn(mu.shape, generator=g, dtype=F64), mu + torch.randn(mu.shape, generator=g, dtype=F64)
        y = ya + torch.randn(mu.shape, generator=g, dtype=F64)
        err = float((shifted_denoise(y, (denoise(ya, sa), ya, sa), (denoise(yb, sb), yb, sb)) - denoise(y, sa)).abs().max())
        assert (err < 1e-12) if exact else (err > 1e-2), err


@pytest.mark.slow
def test_headline_ring_endpoint_error_at_10_and_20_nfe():
    # Issue 3: the 2-D ring with unequal weights/widths under the default VP SDE (sigma ~ 0.01..152),
    # 2000 shared prior draws, RMS endpoint error against solvers.reference. Published best peers:
    # 0.13 at 10 NFE and 0.057 at 20 NFE (diffusers UniPC / DPM-Solver++ 2M); our re-implementation
    # of those (order 2, time-uniform grid) gives 0.137 / 0.056 on this batch, so the batch is
    # representative. The RMS is dominated by the few draws near mode boundaries (one draw switching
    # to a neighbouring component adds ~0.05 at n = 2000), so the margins below are kept wide of that.
    sde = VPSDE()
    gm = GaussianMixture.ring()
    model = gm.eps_model(sde)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(123), dtype=F64)
    ref = reference_solution(model, sde, x_T)
    err = {n: rms(solvers.sample(model, sde, x_T=x_T, sampler="dpm_solver", steps=n).x, ref) for n in (10, 20)}
    assert err[20] < 0.057 / 2
    assert err[10] < 0.13
    peer_like = dict(order=2, corrector=True, schedule="uniform", final_step="dpm")
    assert err[20] < 0.5 * rms(solvers.sample(model, sde, x_T=x_T, sampler="dpm_solver", steps=20, **peer_like).x, ref)


def test_ode_refuses_steps_for_adaptive_methods_and_half_precision():
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    with pytest.raises(ValueError, match="chooses its own steps"):
        DETERMINISTIC["ode"](model, sde, prior(sde, (3, 2)), steps=7)
    with pytest.raises(ValueError, match="float32 or float64"):
        DETERMINISTIC["ode"](model, sde, prior(sde, (3, 2)).half())
    assert DETERMINISTIC["ode"](model, sde, prior(sde, (3, 2)), steps=7, method="rk4").shape == (3, 2)
