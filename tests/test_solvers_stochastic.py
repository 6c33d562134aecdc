"""Reverse-SDE samplers against mathematics: exact Gaussian chain laws, mixture weights, per-sample noise.

Ground truth. For Gaussian data ``N(mu, s0^2 I)`` the exact score is affine in x,
``score(x, t) = -(x - a_t mu) / v_t`` with ``v_t = a_t^2 s0^2 + std_t^2``, so every linear sampler
step is ``x' = A x + B + C z`` and the law of the *discretised* chain is Gaussian with moments given
by the scalar recursion ``m' = A m + B``, ``var' = A^2 var + C^2`` (written below from the papers'
formulas, independently of the sampler code). Each moment test checks (1) the chain is close to the
true law at the step count used (mathematics: the discretisation bias) and (2) the samples match the
chain law within 5 Monte-Carlo standard errors (the implementation). Together they bound the error
against the truth by MC error + known discretisation bias.
"""

from __future__ import annotations

import math

import pytest
import torch

import solvers
from scoresde import SDES, GaussianMixture, SampleNoise, VESDE
from solvers.base import SamplingError, time_grid

Z = 5.0  # MC tolerance in standard errors: two-sided false-alarm rate ~6e-7 per check




# ---------------------------------------------------------------------------------------------
# Exact law of the discretised chain on Gaussian data
# ---------------------------------------------------------------------------------------------
def _f(v) -> float:
    return float(v)


def chain_law(sde, s0: float, steps: int, predictor: str, ald_steps: int = 0, snr: float = 0.16,
              schedule: str = "uniform", denoise_final: bool = True):
    """Return ``(c, var, target_c, target_var)``: the chain's mean is ``c * mu`` and variance ``var``
    per coordinate; ``target_*`` are the same for the exact answer (Tweedie at t_min of the exact
    marginal when ``denoise_final``, else the marginal at t_min)."""
    t = time_grid(sde, steps, schedule)
    f64 = lambda u: torch.tensor(float(u), dtype=torch.float64)  # noqa: E731

    def at(u):
        a, s = _f(sde.alpha(f64(u))), _f(sde.std(f64(u)))
        return a, s, a * a * s0 * s0 + s * s

    c, var = 0.0, float(sde.prior_std) ** 2  # x_T ~ N(0, prior_std^2)
    for i in range(steps):
        ti, tn = float(t[i]), float(t[i + 1])
        a, s, v = at(ti)
        an, sn, vn = at(tn)
        r, q = (_f(u) for u in sde.transition(f64(tn), f64(ti)))
        if predictor == "euler_maruyama":  # x' = x - h (f x - g^2 score) + g sqrt(h) z
            fx, g = sde.sde(torch.ones(1, 1, dtype=torch.float64), f64(ti).reshape(1))
            f, g2, h = _f(fx), _f(g) ** 2, ti - tn
            A, B, C2 = 1 - h * f - h * g2 / v, h * g2 * a / v, g2 * h
        elif predictor == "reverse_diffusion":  # x' = (2 - r) x + q^2 score + q z
            A, B, C2 = 2 - r - q * q / v, q * q * a / v, q * q
        elif predictor == "ancestral":
            # posterior of x_s given x_t and x0 (precision form): prior N(a_s x0, s_s^2), likelihood
            # x_t | x_s ~ N(r x_s, q^2); x0 replaced by Tweedie's x0_hat = k0 x + b0 (mu = 1).
            prec = 1 / sn**2 + r * r / q**2
            k0, b0 = (1 - s * s / v) / a, s * s / v
            A, B, C2 = (an * k0 / sn**2 + r / q**2) / prec, an * b0 / sn**2 / prec, 1 / prec
        else:  # no predictor
            A, B, C2 = 1.0, 0.0, 0.0
        c, var = A * c + B, A * A * var + C2
        for _ in range(ald_steps):  # x' = x + e score + sqrt(2 e) z, e = 2 r^2 (snr std)^2
            e = 2 * r * r * (snr * sn) ** 2
            A, B, C2 = 1 - e / vn, e * an / vn, 2 * e
            c, var = A * c + B, A * A * var + C2
    a, s, v = at(t[-1])
    if denoise_final:  # Tweedie: x0 = (x + std^2 score) / alpha
        A, B = (1 - s * s / v) / a, s * s / v
        return A * c + B, A * A * var, 1.0, s0**4 * a * a / v
    return c, var, a, v


MU = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
S0 = 0.5


def _gaussian_samples(sde_name, sampler, steps, n, seed, **knobs):
    sde = SDES[sde_name]()
    data = GaussianMixture.gaussian(MU, S0)
    res = solvers.sample(data.eps_model(sde), sde, (n, MU.numel()), sampler=sampler, steps=steps,
                         generator=seed, dtype=torch.float64, **knobs)
    return sde, res.x


def _check_moments(x, c, var, target_c, target_var, mean_bias_tol, var_bias_tol):
    n, d = x.shape
    # (1) mathematics: the discretised chain is close to the exact answer at this step count
    assert abs(c - target_c) * float(MU.abs().max()) <= mean_bias_tol, (c, target_c)
    assert abs(var / target_var - 1) <= var_bias_tol, (var, target_var)
    # (2) implementation: samples follow the chain law. Mean: se = sqrt(var / n) per coordinate.
    # Variance pooled over the d independent coordinates: se = var sqrt(2 / (d (n - 1))).
    se_mean = math.sqrt(var / n)
    err = (x.mean(0) - c * MU).abs().max().item()
    assert err <= Z * se_mean, f"mean off by {err:.4g} > {Z} se = {Z * se_mean:.4g}"
    emp_var = x.var(0).mean().item()
    se_var = var * math.sqrt(2.0 / (d * (n - 1)))
    assert abs(emp_var - var) <= Z * se_var, f"variance {emp_var:.5g} vs chain {var:.5g} (se {se_var:.3g})"


# Step counts: with N = 80 the chain biases are <= 16% in variance and <= 0.025 in mean for every
# SDE (O(1/N), see the bias asserts); n = 2000 x 4 coordinates gives a variance se of ~1.6%.
# VP and VE by default; sub-VP and cosine (also covered by the PC, mixture and image tests) under -m slow.
LINEAR_CASES = [
    (p, s) if s in ("vp", "ve") else pytest.param(p, s, marks=pytest.mark.slow)
    for p in ("ancestral", "euler_maruyama", "reverse_diffusion") for s in ("vp", "ve", "subvp", "cosine")
]


@pytest.mark.parametrize("sampler,sde_name", LINEAR_CASES)
def test_predictors_follow_exact_chain_law_and_recover_gaussian(sampler, sde_name):
    steps = 80
    sde, x = _gaussian_samples(sde_name, sampler, steps, 2000, seed=11)
    law = chain_law(sde, S0, steps, sampler)
    _check_moments(x, *law, mean_bias_tol=0.025, var_bias_tol=0.16)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_predictors_without_final_denoising_match_marginal_at_t_min(sde_name):
    steps = 100
    sde, x = _gaussian_samples(sde_name, "euler_maruyama", steps, 3000, seed=12, denoise_final=False)
    law = chain_law(sde, S0, steps, "euler_maruyama", denoise_final=False)
    _check_moments(x, *law, mean_bias_tol=0.02, var_bias_tol=0.03)


@pytest.mark.parametrize("sde_name,schedule", [("vp", "logsnr"), ("ve", "uniform")])
def test_annealed_langevin_follows_exact_chain_law(sde_name, schedule):
    # ALD alone mixes slowly at snr = 0.16 (the chain stays ~25% too wide even with 1000 levels);
    # snr = 0.5 with 3 steps per level brings the chain within ~4% of the truth.
    steps, knobs = 150, dict(snr=0.5, corrector_steps=3, schedule=schedule)
    sde, x = _gaussian_samples(sde_name, "langevin", steps, 1000, seed=13, **knobs)
    law = chain_law(sde, S0, steps, "none", ald_steps=3, snr=0.5, schedule=schedule)
    _check_moments(x, *law, mean_bias_tol=0.03, var_bias_tol=0.08)


@pytest.mark.parametrize("sde_name,predictor", [("vp", "reverse_diffusion"), ("ve", "reverse_diffusion"),
                                                ("subvp", "ancestral"), ("cosine", "euler_maruyama")])
def test_pc_with_ald_corrector_follows_exact_chain_law(sde_name, predictor):
    steps = 80
    sde, x = _gaussian_samples(sde_name, "pc", steps, 2000, seed=14, predictor=predictor, corrector="ald")
    law = chain_law(sde, S0, steps, predictor, ald_steps=1)
    _check_moments(x, *law, mean_bias_tol=0.03, var_bias_tol=0.2)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_torchsde_euler_follows_euler_maruyama_chain_law(sde_name):
    # torchsde's Euler on the reverse SDE in tau = T - t takes exactly our Euler-Maruyama steps.
    steps = 100
    sde, x = _gaussian_samples(sde_name, "sde", steps, 3000, seed=15)
    _check_moments(x, *chain_law(sde, S0, steps, "euler_maruyama"), mean_bias_tol=0.02, var_bias_tol=0.03)


def test_torchsde_srk_recovers_gaussian():
    # SRA1 (weak order 2 for additive noise) has no closed-form chain law here; we allow it the bias
    # of Euler-Maruyama at the same steps (a weak order-1 method), plus 5 MC standard errors.
    steps = 60
    sde, x = _gaussian_samples("vp", "sde", steps, 3000, seed=16, method="srk")
    c, var, tc, tv = chain_law(sde, S0, steps, "euler_maruyama")
    n, d = x.shape
    assert (x.mean(0) - MU).abs().max().item() <= Z * math.sqrt(tv / n) + abs(c - tc) * float(MU.abs().max())
    assert abs(x.var(0).mean().item() - tv) <= Z * tv * math.sqrt(2 / (d * (n - 1))) + abs(var - tv)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_pc_langevin_snr_rule_recovers_gaussian_in_higher_dimension(sde_name):
    # The per-sample snr rule has a state-dependent step e ~ 1/||score||^2, whose chain leaves
    # p / e ~ p ||x - mean||^2 invariant: a variance bias of order 1/D (see pc's docstring). At
    # D = 64 its stationary bias is 2/D from the radius law chi^2_D -> chi^2_{D+2}, about doubled by
    # the ||z|| coupling, plus fixed-step ULA's ~snr^2 = 2.6%: we allow 6/D + 2 snr^2 + the
    # reverse-diffusion chain's own bias on top of 5 MC standard errors. Means are unbiased by symmetry
    # up to the predictor's bias.
    steps, d, n = 60, 64, 400
    sde = SDES[sde_name]()
    mu = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    data = GaussianMixture.gaussian(mu, S0)
    x = solvers.sample(data.eps_model(sde), sde, (n, d), sampler="pc", steps=steps, generator=17,
                       dtype=torch.float64).x
    c, var, tc, tv = chain_law(sde, S0, steps, "reverse_diffusion")
    mean_err = (x.mean(0) - mu).abs().max().item()
    assert mean_err <= Z * math.sqrt(1.3 * tv / n) + abs(c - tc), mean_err
    rel = x.var(0).mean().item() / tv - 1
    allowance = 6 / d + 2 * 0.16**2 + abs(var / tv - 1) + Z * math.sqrt(2 / (d * (n - 1)))
    assert -Z * math.sqrt(2 / (d * (n - 1))) - abs(var / tv - 1) <= rel <= allowance, rel


# ---------------------------------------------------------------------------------------------
# Mixture: weight recovery
# ---------------------------------------------------------------------------------------------
MIXTURE_CASES = [
    ("ancestral", "vp", {}), ("euler_maruyama", "ve", {}), ("reverse_diffusion", "subvp", {}),
    ("pc", "vp", {"corrector": "ald"}), ("pc", "ve", {"corrector": "ald", "predictor": "ancestral"}),
    pytest.param("langevin", "ve", {"snr": 0.5, "corrector_steps": 3}, marks=pytest.mark.slow),  # 300 NFE
    ("sde", "cosine", {}),
]


@pytest.mark.parametrize("sampler,sde_name,knobs", MIXTURE_CASES)
def test_mixture_weights_recovered(sampler, sde_name, knobs):
    """Fraction of samples nearest each of 8 ring components vs the weights (1..8)/36.

    Binomial error bar sqrt(w (1 - w) / n) per component, 5 of them; plus 0.002 for samples of
    one component falling nearer a neighbour (means 3.06 apart, widest std 0.45: 3.4 sd to the
    midline, P ~ 3e-4 per side) and for the discretisation bias at 100 steps (at n = 20000 all these
    cases stayed within 3.5 binomial sd, i.e. below 0.005 in weight).
    """
    sde = SDES[sde_name]()
    mix = GaussianMixture.ring()
    n = 2000
    x = solvers.sample(mix.eps_model(sde), sde, (n, 2), sampler=sampler, steps=100, generator=21, **knobs).x
    nearest = torch.cdist(x.double(), mix.means).argmin(1)
    frac = torch.bincount(nearest, minlength=8).double() / n
    w = mix.weights
    bound = Z * torch.sqrt(w * (1 - w) / n) + 0.002 + 0.005
    assert bool(torch.all((frac - w).abs() <= bound)), (frac - w).tolist()


# ---------------------------------------------------------------------------------------------
# Per-sample reproducibility, images, NaN guard, knobs, NFE
# ---------------------------------------------------------------------------------------------
REPRO_CASES = [
    ("ancestral", {}), ("euler_maruyama", {}), ("reverse_diffusion", {}), ("pc", {}),
    ("pc", {"predictor": "ancestral", "corrector": "ald", "corrector_steps": 2}),
    ("pc", {"predictor": "euler_maruyama", "corrector": "none"}), ("langevin", {}),
    ("langevin", {"corrector": "langevin"}), ("sde", {}), ("sde", {"method": "srk", "dt": 0.02}),
    ("sde", {"method": "heun"}),
]


@pytest.mark.parametrize("sampler,knobs", REPRO_CASES)
def test_sample_is_independent_of_its_batch(sampler, knobs):
    """Sample i of seed 7 is the same drawn alone or among 8 (per-sample noise streams)."""
    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    run = lambda shape, gen: solvers.sample(model, sde, shape, sampler=sampler, steps=6, generator=gen,  # noqa: E731
                                            dtype=torch.float64, **knobs).x
    batch = run((8, 2), 7)
    for i in (5,):
        alone = run((1, 2), SampleNoise(7, 8).subset(slice(i, i + 1)))
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-12, atol=1e-12)
    other = run((8, 2), 8)
    assert not torch.allclose(other, batch)  # the seed matters


def test_torchsde_interval_brownian_is_reproducible_and_adaptive():
    """brownian='interval' (torchsde's BrownianInterval, seeded from the generator) reproduces a
    batch exactly for the same seed; it is the mode that allows adaptive stepping."""
    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    kw = dict(sampler="sde", steps=5, brownian="interval", adaptive=True, method="srk", rtol=1e-2, atol=1e-2,
              dtype=torch.float64)
    a = solvers.sample(model, sde, (6, 2), generator=3, **kw)
    b = solvers.sample(model, sde, (6, 2), generator=3, **kw)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    assert not torch.allclose(solvers.sample(model, sde, (6, 2), generator=4, **kw).x, a.x)


ALL_SAMPLERS = sorted(name for name, record in solvers.SAMPLERS.items() if record.stochastic)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_image_shaped_mixture_runs(sampler, sde_name):
    """(B, 1, 4, 4) data: per-sample scalars broadcast over any rank; samples land near a mean."""
    sde = SDES[sde_name]()
    means = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0)]).double()
    mix = GaussianMixture(means, 0.1)
    # ALD at its default snr mixes too slowly for 25 levels; give it the settings of the moment test
    knobs = {"snr": 0.5, "corrector_steps": 2} if sampler == "langevin" else {}
    res = solvers.sample(mix.eps_model(sde), sde, (6, 1, 4, 4), sampler=sampler, steps=25, generator=0,
                         dtype=torch.float64, **knobs)
    assert res.x.shape == (6, 1, 4, 4) and bool(torch.isfinite(res.x).all())
    # distance to the nearest mean: exact samples have sqrt(16) * 0.1 = 0.4 on average
    dist = torch.cdist(res.x.reshape(6, -1), means.reshape(2, -1)).min(1).values
    assert bool((dist < 1.5).all()), dist


class _NaNAfter:
    """Exact model that returns NaN from its k-th call on (0-based)."""

    def __init__(self, model, k):
        self.model, self.k, self.calls = model, k, 0

    def __call__(self, x, t, **kw):
        out = self.model(x, t, **kw)
        self.calls += 1
        return out * float("nan") if self.calls > self.k else out


@pytest.mark.parametrize("sampler,knobs,per_step", [
    ("ancestral", {}, 1), ("euler_maruyama", {}, 1), ("reverse_diffusion", {}, 1), ("pc", {}, 2),
    ("langevin", {"corrector_steps": 2, "schedule": "uniform"}, 2), ("sde", {}, 1),
])
def test_nan_guard_names_step_and_time(sampler, knobs, per_step):
    sde = SDES["vp"]()
    steps, k = 10, 6
    model = _NaNAfter(GaussianMixture.ring().eps_model(sde), k)
    with pytest.raises(SamplingError) as err:
        solvers.sample(model, sde, (4, 2), sampler=sampler, steps=steps, generator=0, **knobs)
    step = k // per_step
    t = float(time_grid(sde, steps)[step + 1])
    assert f"step {step}" in str(err.value) and f"{t:.6g}" in str(err.value), str(err.value)


def test_unknown_knob_lists_accepted_ones():
    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    for name in ALL_SAMPLERS:
        with pytest.raises(TypeError) as err:
            solvers.sample(model, sde, (2, 2), sampler=name, steps=2, generator=0, bogus=1)
        msg = str(err.value)
        assert "bogus" in msg and all(k in msg for k in solvers.SAMPLERS[name].defaults()), msg


@pytest.mark.parametrize("sampler,knobs,word", [
    ("pc", {"predictor": "heun"}, "predictor"), ("pc", {"corrector": "mala"}, "corrector"),
    ("langevin", {"corrector": "none"}, "corrector"), ("pc", {"snr": -1.0}, "snr"),
    ("pc", {"corrector_steps": 1.5}, "corrector_steps"),
    ("pc", {"predictor": "none", "corrector": "none"}, "corrector"),
    ("ancestral", {"schedule": "cubic"}, "schedule"), ("ancestral", {"denoise_final": "yes"}, "denoise_final"),
    ("euler_maruyama", {"t_min": 2.0}, "t_min"), ("sde", {"method": "rk4"}, "method"),
    ("sde", {"adaptive": True}, "brownian"), ("sde", {"brownian": "tree"}, "brownian"), ("sde", {"dt": -0.1}, "dt"),
])
def test_bad_knob_values_raise_value_error(sampler, knobs, word):
    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    with pytest.raises(ValueError, match=word):
        solvers.sample(model, sde, (2, 2), sampler=sampler, steps=3, generator=0, **knobs)


class _FrozenNoiseSDE(VESDE):
    """A VE SDE whose noise stops growing: no Gaussian kernel between distinct grid times."""

    def _std(self, t):
        return torch.full_like(t, 1.0)


def test_sde_without_growing_noise_is_refused():
    sde = _FrozenNoiseSDE()
    model = GaussianMixture.ring().eps_model(VESDE())
    with pytest.raises(ValueError, match="transition std"):
        solvers.sample(model, sde, (2, 2), sampler="ancestral", steps=3, generator=0)


@pytest.mark.parametrize("sampler,knobs,expected", [
    ("ancestral", {}, lambda n: n + 1),
    ("ancestral", {"denoise_final": False}, lambda n: n),
    ("euler_maruyama", {}, lambda n: n + 1),
    ("reverse_diffusion", {"denoise_final": False}, lambda n: n),
    ("pc", {}, lambda n: 2 * n + 1),  # one predictor + one corrector evaluation per step
    ("pc", {"corrector_steps": 3}, lambda n: 4 * n + 1),
    ("pc", {"corrector": "none", "denoise_final": False}, lambda n: n),
    ("pc", {"predictor": "none"}, lambda n: n + 1),
    ("langevin", {"corrector_steps": 2}, lambda n: 2 * n + 1),
    ("sde", {}, lambda n: n + 1),
    ("sde", {"dt": (1.0 - 1e-3) / 14}, lambda n: 2 * n + 1),  # two solver steps per report interval
    ("sde", {"method": "srk"}, lambda n: 2 * n + 1),
    ("sde", {"method": "euler_heun", "denoise_final": False}, lambda n: n),
])
def test_nfe_counts(sampler, knobs, expected):
    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    res = solvers.sample(model, sde, (3, 2), sampler=sampler, steps=7, generator=0, **knobs)
    assert res.nfe == expected(7)


def test_callback_sees_every_step_and_final_denoise():
    sde = SDES["ve"]()
    model = GaussianMixture.ring().eps_model(sde)
    res = solvers.sample(model, sde, (3, 2), sampler="pc", steps=6, generator=0, keep_trajectory=True)
    grid = time_grid(sde, 6)
    assert res.trajectory.shape == (8, 3, 2)  # x_T, six steps, the final denoise
    torch.testing.assert_close(res.times[:-1], grid.to(res.times.dtype))
    assert float(res.times[-1]) == 0.0
    torch.testing.assert_close(res.trajectory[-1], res.x)
    assert bool(torch.isnan(res.denoised[0]).all())  # x_T has no denoised estimate
    assert bool(torch.isfinite(res.denoised[1:]).all())


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_model_kwargs_reach_every_evaluation(sampler):
    sde = SDES["vp"]()
    exact = GaussianMixture.ring().eps_model(sde)
    seen = []

    def model(x, t, **kw):
        seen.append(kw)
        return exact(x, t)

    y = torch.tensor([1, 0, 1])
    res = solvers.sample(model, sde, (3, 2), sampler=sampler, steps=4, generator=0, model_kwargs={"y": y})
    assert len(seen) == res.nfe and all(kw.keys() == {"y"} and kw["y"] is y for kw in seen)


def test_finite_guard_is_exact_when_the_cheap_sum_overflows():
    """``all_finite`` reads one sum; a finite state whose sum overflows (float16 above 65504, float32
    above 3.4e38) must still pass, and any NaN or +-Inf (even Inf and -Inf together, whose sum is NaN)
    must fail."""
    from solvers.base import Run, all_finite

    for x in (torch.full((8, 100), 60000.0, dtype=torch.float16), torch.full((4, 3), 3e38, dtype=torch.float32)):
        assert not math.isfinite(float(x.sum())) and all_finite(x)
        Run(lambda x, t: x, SDES["vp"](), x.float() if x.dtype == torch.float16 else x).report(0, 0.5, x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float16, torch.float32, torch.float64):
            x = torch.zeros(5, 7, dtype=dtype)
            x[3, 2] = bad
            assert not all_finite(x)
    x = torch.zeros(5, 7)
    x[0, 0], x[4, 6] = float("inf"), -float("inf")
    assert not all_finite(x)
    with pytest.raises(SamplingError, match=r"step 3 \(t = 0\.25\)"):
        Run(lambda x, t: x, SDES["vp"](), torch.zeros(5, 7)).report(3, 0.25, x)


@pytest.mark.parametrize("sampler", ["ancestral", "euler_maruyama", "reverse_diffusion", "pc", "langevin"])
def test_reported_denoised_is_tweedie_of_the_last_call_and_inputs_are_untouched(sampler):
    """The loop updates with fused in-place ops on fresh noise; the reported ``denoised`` (computed only
    when a callback is given) is ``(x - std eps) / alpha`` of the step's last network call, and neither
    ``x_T`` nor a tensor the model hands back is ever modified."""
    sde = SDES["vp"]()
    inner = GaussianMixture.ring().eps_model(sde)
    calls, returned = [], []

    def model(x, t, **kw):
        eps = inner(x, t)
        calls.append((x.clone(), t.clone(), eps.clone()))
        returned.append(eps)
        return eps

    reports = []
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T0 = x_T.clone()
    solvers.SAMPLERS[sampler](model, sde, x_T, steps=6, generator=1, denoise_final=False,
                              callback=lambda d: reports.append((len(calls), d["denoised"].clone())))
    assert torch.equal(x_T, x_T0)
    assert all(torch.equal(r, c[2]) for r, c in zip(returned, calls))
    assert len(reports) == 6
    for n_calls, den in reports:
        x, t, eps = calls[n_calls - 1]
        want = (x - sde.std(t)[:, None] * eps) / sde.alpha(t)[:, None]
        torch.testing.assert_close(den, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sampler,knobs", [("ancestral", {}), ("pc", {}), ("langevin", {"corrector_steps": 2})])
def test_noise_drawn_ahead_in_blocks_changes_nothing(sampler, knobs, monkeypatch):
    """Run.noise draws upcoming streams in blocks; the samples are bit-identical to drawing each stream
    on its own, and no stream past the sampler's declared range is ever drawn."""
    import solvers.base as base

    sde = SDES["vp"]()
    model = GaussianMixture.ring().eps_model(sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    drawn = []
    real = SampleNoise.randn_streams

    def spy(self, shape, stream, count, **kw):
        drawn.extend(range(stream, stream + count))
        return real(self, shape, stream, count, **kw)

    monkeypatch.setattr(SampleNoise, "randn_streams", spy)
    ahead = solvers.SAMPLERS[sampler](model, sde, x_T, steps=7, generator=4, **knobs)
    n_streams = {"ancestral": 7, "pc": 14, "langevin": 14}[sampler]
    assert sorted(drawn) == list(range(1, n_streams + 1))  # Run.noise shifts streams by one
    monkeypatch.setattr(base, "NOISE_AHEAD", 1)
    one = solvers.SAMPLERS[sampler](model, sde, x_T, steps=7, generator=4, **knobs)
    assert torch.equal(ahead, one)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_sde_with_torchsde_euler_equals_our_euler_maruyama(sde_name):
    # two implementations of one scheme: torchsde's Euler on the reverse SDE in tau = T - t, and our
    # Euler-Maruyama predictor, on the same grid and the same per-sample noise streams
    sde = SDES[sde_name]()
    mix = GaussianMixture.ring(4, radius=2.0, std=0.3)
    x_T = sde.prior_std * torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = solvers.SAMPLERS["euler_maruyama"](mix.eps_model(sde), sde, x_T, steps=15, generator=4)
    theirs = solvers.SAMPLERS["sde"](mix.eps_model(sde), sde, x_T, steps=15, generator=4, method="euler")
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-9)
    other_seed = solvers.SAMPLERS["sde"](mix.eps_model(sde), sde, x_T, steps=15, generator=5, method="euler")
    assert not torch.allclose(ours, other_seed, atol=1e-3)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("sampler,steps,tol", [("pc", 200, 0.05), ("langevin", 1000, 0.06)])
def test_default_pc_and_langevin_converge_in_two_dimensions(sde_name, sampler, steps, tol):
    """Issue 17 item 5: with their defaults both reach the variance of N(0, 0.5^2) data in 2-D
    (the paper's per-sample snr rule gave 5.5x (VP) / 14x (VE) the variance with pc at 200 steps,
    and the old langevin defaults +20-24 %); sampling error of the variance at n = 4000: ~2.2 %."""
    sde = SDES[sde_name]()
    data = GaussianMixture.gaussian(torch.zeros(2, dtype=torch.float64), 0.5)
    x = solvers.sample(data.eps_model(sde), sde, (4000, 2), sampler=sampler, steps=steps, generator=31,
                       dtype=torch.float64).x
    ratio = x.var(dim=0) / 0.25
    assert bool(((ratio - 1).abs() < tol).all()), ratio


@pytest.mark.parametrize("knobs", [{}, {"corrector": "langevin"}])
@pytest.mark.parametrize("sampler", ["pc", "langevin"])
def test_a_zero_network_output_is_harmless(sampler, knobs):
    # the package's zero-initialised U-Net returns eps = 0: the paper's step 1/||score||^2 was infinite
    sde = SDES["ve"]()
    x = solvers.sample(lambda x, t: torch.zeros_like(x), sde, (8, 1, 4, 4), sampler=sampler, steps=20, generator=0,
                       **knobs).x
    assert bool(torch.isfinite(x).all())
