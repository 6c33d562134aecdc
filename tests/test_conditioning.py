"""Conditioning methods against exact posteriors of Gaussian-mixture priors.

Every statistical check compares an unbiased MMD^2 (analytic mixture terms) with its own jackknife
standard error, or moments with their sampling standard errors; each also checks that the
unconditional distribution is far outside the same bound, so the check has power.
"""

import math

import pytest
import torch

import solvers
from scoresde import GaussianMixture, VPSDE
from scoresde.conditioning import (
    ClassifierGuidance,
    Colorize,
    Downsample,
    Mask,
    MatrixOperator,
    MixtureClassifier,
    NoisyClassifier,
    Observation,
    conditional_sample,
    component_weights,
    default_bandwidth,
    mmd2,
    repaint_nfe,
    repaint_schedule,
    smc_sample,
    train_classifier,
)
from scoresde.conditioning.methods import ReplacementHook, ancestral_moments, sde_dpmpp_2m
from scoresde.parameterization import eps_to_x0
from scoresde.noise import SampleNoise

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------
def operators():
    g = torch.Generator().manual_seed(0)
    return {
        "mask_vec": Mask(torch.tensor([True, False, True, True, False])),
        "mask_img": Mask.from_name("lower", (2, 4, 4)),
        "colorize": Colorize((3, 4, 4)),
        "superres": Downsample((2, 4, 6), 2),
        "matrix": MatrixOperator(torch.randn(3, 5, generator=g, dtype=F64)),
        "matrix_img": MatrixOperator(torch.randn(4, 12, generator=g, dtype=F64), in_shape=(1, 3, 4)),
    }


@pytest.mark.parametrize("name", sorted(operators()))
def test_operator_adjoint_pinv_solve_match_the_dense_matrix(name):
    op = operators()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *op.in_shape, generator=g, dtype=F64)
    y = torch.randn(3, *op.out_shape, generator=g, dtype=F64)
    m = op.matrix()
    assert m.shape == (op.out_dim, op.in_dim)
    torch.testing.assert_close(op(x).reshape(3, -1), x.reshape(3, -1) @ m.T)
    # adjoint: <A x, y> = <x, A^T y>
    torch.testing.assert_close((op(x) * y).sum(), (x * op.adjoint(y)).sum())
    torch.testing.assert_close(op.adjoint(y).reshape(3, -1), y.reshape(3, -1) @ m)
    # pseudo-inverse (full row rank here): A A^+ y = y and A^+ = pinv(M)
    torch.testing.assert_close(op.forward(op.pinv(y)), y)
    torch.testing.assert_close(op.pinv(y).reshape(3, -1), y.reshape(3, -1) @ torch.linalg.pinv(m).T)
    # (a A A^T + b I)^{-1} y with per-sample a, b
    a, b = torch.tensor([0.5, 2.0, 1.0], dtype=F64), torch.tensor([0.1, 0.0, 3.0], dtype=F64)
    got = op.solve(y, a, b).reshape(3, -1)
    for i in range(3):
        want = torch.linalg.solve(a[i] * m @ m.T + b[i] * torch.eye(op.out_dim, dtype=F64), y[i].reshape(-1))
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(op.gram_eigenvalues().sort().values, torch.linalg.eigvalsh(m @ m.T).sort().values)


def test_named_masks_and_bad_masks():
    m = Mask.from_name("lower", (1, 8, 8))
    assert m.out_shape == (32,) and bool(m.mask[0, :4].all()) and not bool(m.mask[0, 4:].any())
    assert Mask.from_name("keep:0,2", (3,)).out_shape == (2,)
    with pytest.raises(ValueError, match="unknown mask"):
        Mask.from_name("diagonal", (1, 8, 8))
    with pytest.raises(ValueError, match="at least one observed"):
        Mask(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        Downsample((1, 5, 5), 2)
    with pytest.raises(ValueError, match="colour"):
        Colorize((1, 4, 4))


# ---------------------------------------------------------------------------------------------
# the exact posterior
# ---------------------------------------------------------------------------------------------
def test_full_covariance_mixture_matches_the_isotropic_one_and_autograd():
    gm, sde = GaussianMixture.random(3, k=4, seed=2), VPSDE()
    full = gm.as_full()
    x = 2 * torch.randn(20, 3, dtype=F64)
    t = torch.rand(20, dtype=F64) * 0.9 + 0.05
    torch.testing.assert_close(full.eps(sde, x, t), gm.eps(sde, x, t))
    torch.testing.assert_close(full.marginal_log_prob(sde, x, t), gm.marginal_log_prob(sde, x, t))
    # a genuinely full covariance: score = grad of the marginal log-density
    post = gm.posterior(torch.tensor([[1.0, 2.0, -1.0]], dtype=F64), torch.tensor([0.7]), 0.4)
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(post.marginal_log_prob(sde, xg, t).sum(), xg)[0]
    torch.testing.assert_close(post.score(sde, x, t), grad)


def test_posterior_matches_numerical_integration_in_2d():
    """p(x | y) ∝ p(x) N(y; A x, sigma^2) on a fine grid: density, evidence and component weights."""
    gm = GaussianMixture.ring(k=6, radius=2.0, std=0.5)
    A, y, sy = torch.tensor([[1.0, 0.5]], dtype=F64), torch.tensor([1.3], dtype=F64), 0.4
    post = gm.posterior(A, y, sy)
    u = torch.linspace(-5, 5, 801, dtype=F64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    cell = float(u[1] - u[0]) ** 2
    loglik = -0.5 * ((y - pts @ A.T[:, 0]) / sy) ** 2 - math.log(sy * math.sqrt(2 * math.pi))
    joint = gm.log_prob(pts) + loglik
    evidence = torch.logsumexp(joint, 0) + math.log(cell)
    assert abs(float(evidence) - post.log_evidence) < 1e-6
    torch.testing.assert_close(post.log_prob(pts), joint - evidence, rtol=0, atol=1e-6)
    # component weights: integral of w_k N_k(x) N(y; A x) over the grid
    comp = torch.stack([math.log(w) + GaussianMixture.gaussian(m, s).log_prob(pts) + loglik
                        for m, s, w in zip(gm.means, gm.stds, gm.weights.tolist())])
    weights = torch.softmax(torch.logsumexp(comp, 1), 0)
    torch.testing.assert_close(post.weights, weights, rtol=0, atol=1e-6)


def test_posterior_weights_and_mean_match_importance_sampling_in_16d():
    """Prior draws weighted by the likelihood: component weights within 5 standard errors."""
    gm = GaussianMixture.random(16, k=5, seed=4, scale=1.0, std_range=(0.6, 1.0))
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 16, generator=g, dtype=F64) / 4
    x_true = gm.sample(1, g)[0]
    sy = 0.5
    y = A @ x_true + sy * torch.randn(3, generator=g, dtype=F64)
    post = gm.posterior(A, y, sy)
    n = 200_000
    idx = torch.multinomial(gm.weights, n, replacement=True, generator=g)
    x = gm.means[idx] + gm.stds[idx, None] * torch.randn(n, 16, generator=g, dtype=F64)
    logw = -0.5 * (((y - x @ A.T) / sy) ** 2).sum(1)
    w = torch.softmax(logw, 0)
    ess = 1.0 / float((w**2).sum())
    assert ess > 2000
    est = torch.zeros(gm.num_components, dtype=F64).index_add_(0, idx, w)
    se = torch.sqrt(est * (1 - est) / ess)
    assert torch.all((est - post.weights).abs() < 5 * se + 1e-3), (est, post.weights)
    mean_se = torch.sqrt(torch.diag(post.covariance()) / ess)
    assert torch.all(((w[:, None] * x).sum(0) - post.mean()).abs() < 5 * mean_se)


def test_noise_free_posterior_is_the_limit_and_satisfies_the_constraint():
    gm = GaussianMixture.random(4, k=3, seed=1)
    A = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]], dtype=F64)
    y = torch.tensor([0.5, -1.0], dtype=F64)
    exact, near = gm.posterior(A, y, 0.0), gm.posterior(A, y, 1e-5)
    torch.testing.assert_close(exact.weights, near.weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.means, near.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.covs, near.covs, rtol=0, atol=1e-6)
    x = exact.sample(100, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x @ A.T, y.expand(100, 2))
    # a redundant row (rank-deficient A A^T) changes nothing at sigma_y = 0
    A3 = torch.cat([A, (A[0] + A[1])[None]])
    same = gm.posterior(A3, torch.cat([y, (y[0] + y[1])[None]]), 0.0)
    torch.testing.assert_close(same.weights, exact.weights)
    torch.testing.assert_close(same.covs, exact.covs)


def test_posterior_bad_input():
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError, match="sigma_y"):
        gm.posterior(torch.eye(2), torch.zeros(2), -0.1)
    with pytest.raises(ValueError, match="A must act"):
        gm.posterior(torch.eye(3), torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="y has"):
        gm.posterior(torch.eye(2), torch.zeros(3), 0.1)


# ---------------------------------------------------------------------------------------------
# problems shared by the sampling tests
# ---------------------------------------------------------------------------------------------
def ring_problem(kind: str):
    gm = GaussianMixture.ring()
    if kind == "impute":  # observe the first coordinate exactly; two components compete
        op, y, sy = Mask.from_name("keep:0", (2,)), torch.tensor([2.6], dtype=F64), 0.0
    else:  # a noisy random projection
        op, y, sy = MatrixOperator(torch.tensor([[1.0, 0.5]], dtype=F64)), torch.tensor([2.0], dtype=F64), 0.3
    return gm, Observation(op, y, sy), gm.posterior(op, y, sy)


def _close_to(x, post, far_from=None, k=5.0):
    h = default_bandwidth(post)
    m = mmd2(x, post, h)
    assert m.mmd2 < k * m.std + 1e-4, (m, "not within the estimator's noise")
    if far_from is not None:
        u = mmd2(far_from, post, h)
        assert u.mmd2 > 10 * k * m.std, (u, m, "the check has no power")
    return m


#: steps at which each registered sampler has converged on the 2-D posteriors (None: adaptive)
POSTERIOR_STEPS = {"ddim": 50, "dpm_solver": 20, "ancestral": 200, "euler_maruyama": 400, "reverse_diffusion": 300,
                   "pc": 200, "langevin": 1000, "sde": 400, "dpmpp_2m_sde": 50, "heun": 30, "ode": None}


def test_every_registered_sampler_is_in_the_posterior_check():
    assert set(solvers.SAMPLERS) <= set(POSTERIOR_STEPS) | {"toy_euler", "toy_cli"}


@pytest.mark.parametrize("sampler", sorted(POSTERIOR_STEPS))
@pytest.mark.parametrize("kind", ["impute", "project"])
def test_exact_posterior_model_with_every_sampler_hits_the_posterior(sampler, kind):
    """The plumbing: the exact posterior's eps model, run through every sampler, samples the posterior."""
    gm, obs, post = ring_problem(kind)
    sde = VPSDE()
    n = 1000
    steps = POSTERIOR_STEPS[sampler]
    res = solvers.sample(post.eps_model(sde), sde, (n, 2), sampler=sampler, steps=steps, generator=0, dtype=F64)
    _close_to(res.x, post, far_from=gm.sample(n, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------
METHOD_CASES = [
    ("replacement", "impute", dict(steps=100)),
    ("repaint", "impute", dict(steps=40, jump_length=5, resamplings=4)),
    ("pigdm", "impute", dict(steps=100)),
    ("pigdm", "project", dict(steps=100)),
    ("pigdm_2m", "impute", dict(steps=49)),
    ("pigdm_2m", "project", dict(steps=49, data_var=0.25)),
    ("dps", "project", dict(steps=100)),
    ("smc", "impute", dict(steps=30, particles=8)),
    ("smc", "project", dict(steps=30, particles=8)),
]


@pytest.mark.parametrize("method, kind, knobs", METHOD_CASES)
def test_each_method_beats_the_unconditional_distribution(method, kind, knobs):
    gm, obs, post = ring_problem(kind)
    sde = VPSDE()
    n = 400
    res = conditional_sample(gm.eps_model(sde), sde, obs, n, method=method, generator=1, dtype=F64, **knobs)
    h = default_bandwidth(post)
    got, unconditional = mmd2(res.x, post, h), mmd2(gm.sample(n, torch.Generator().manual_seed(2)), post, h)
    assert got.mmd2 < 0.25 * unconditional.mmd2, (method, got, unconditional)
    if obs.sigma_y == 0 and method in ("replacement", "repaint", "pigdm_2m"):  # the observed part is put in exactly
        torch.testing.assert_close(obs.operator(res.x), obs.y.expand(n, 1))


def test_pigdm_is_exact_for_a_gaussian_prior():
    """For N(m, v I) data, p(y | x_t) = N(A x0_hat, r_t^2 A A^T + sigma^2 I) exactly: ΠGDM with the exact
    model then samples the exact posterior; mean and covariance within their standard errors."""
    g1 = GaussianMixture.gaussian([1.0, -1.0, 0.5], 0.7)
    op = MatrixOperator(torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, -1.0]], dtype=F64))
    y, sy = torch.tensor([0.5, 2.0], dtype=F64), 0.2
    post = g1.posterior(op, y, sy)
    sde = VPSDE()
    n = 4000
    res = conditional_sample(g1.eps_model(sde), sde, Observation(op, y, sy), n, method="pigdm", sampler="ddim",
                             steps=100, generator=0, dtype=F64, data_var=0.49)
    cov = post.covs[0]
    se = torch.sqrt(torch.diag(cov) / n)
    assert torch.all((res.x.mean(0) - post.means[0]).abs() < 5 * se)
    assert torch.all((torch.cov(res.x.T) - cov).abs() < 5 * torch.sqrt((cov**2 + torch.outer(cov.diag(), cov.diag())) / n))
    # and a wrong data variance is visibly off
    bad = conditional_sample(g1.eps_model(sde), sde, Observation(op, y, sy), n, method="pigdm", sampler="ddim",
                             steps=100, generator=0, dtype=F64, data_var=25.0)
    assert not torch.all((bad.x.mean(0) - post.means[0]).abs() < 5 * se)


def test_sde_dpmpp_2m_first_order_is_the_ancestral_step():
    """With D_i = x0_i the 2M update is the DDPM posterior q(x_s | x_t, x0_hat) drawn with the same noise."""
    gm, sde = GaussianMixture.ring(), VPSDE()
    model = gm.eps_model(sde)
    noise = SampleNoise(3, torch.arange(5))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t_min = 0.3
    got = sde_dpmpp_2m(model, sde, x, steps=1, noise=noise, order=1, t_min=t_min, denoise_final=False)
    t = torch.full((5,), sde.T, dtype=F64)
    mean, var = ancestral_moments(sde, x, eps_to_x0(x, model(x, t), sde, t), sde.T, t_min)
    torch.testing.assert_close(got, mean + var**0.5 * noise.randn_like(x, 1))


def test_sde_dpmpp_2m_with_the_exact_model_samples_the_mixture_where_ancestral_does_not():
    """16-D mixture posterior (narrow components), exact eps model, 30 steps: the second-order sampler
    is within the MMD estimator's noise; the first-order (ancestral) chain on the same grid is not."""
    gm = GaussianMixture.random(16, k=8, seed=0)
    op = Mask.from_name("keep:" + ",".join(map(str, range(8))), (16,))
    y = gm.sample(1, torch.Generator().manual_seed(4))[0, :8]
    post, sde, n = gm.posterior(op, y, 0.0), VPSDE(), 1000
    x_T = torch.randn(n, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    x2 = sde_dpmpp_2m(post.eps_model(sde), sde, x_T, steps=30, noise=SampleNoise(0, n))
    m = _close_to(x2, post, far_from=gm.sample(n, torch.Generator().manual_seed(0)))
    x1 = sde_dpmpp_2m(post.eps_model(sde), sde, x_T, steps=30, noise=SampleNoise(0, n), order=1)
    assert mmd2(x1, post, default_bandwidth(post)).mmd2 > 5 * m.std + 1e-4


def test_pigdm_2m_hits_the_exact_posterior_of_a_16d_imputation():
    """ΠGDM guidance on the 2M sampler, 50 NFE, noise-free half of the coordinates observed: within the
    MMD estimator's noise of the exact posterior, y in the observed block exactly, NFE = steps + 1."""
    gm = GaussianMixture.random(16, k=8, seed=0)
    op = Mask.from_name("keep:" + ",".join(map(str, range(8))), (16,))
    y = gm.sample(1, torch.Generator().manual_seed(4))[0, :8]
    post, sde, n = gm.posterior(op, y, 0.0), VPSDE(), 1000
    res = conditional_sample(gm.eps_model(sde), sde, Observation(op, y, 0.0), n, method="pigdm_2m", steps=49,
                             generator=0, dtype=F64)
    assert res.nfe == 50
    torch.testing.assert_close(res.x[:, :8], y.expand(n, 8))
    _close_to(res.x, post, far_from=gm.sample(n, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="order"):
        conditional_sample(gm.eps_model(sde), sde, Observation(op, y, 0.0), 2, method="pigdm_2m", steps=3, order=3)
    with pytest.raises(TypeError, match="unknown option"):
        conditional_sample(gm.eps_model(sde), sde, Observation(op, y, 0.0), 2, method="pigdm_2m", steps=3, particles=3)


def test_pigdm_2m_output_does_not_depend_on_the_batch():
    gm, obs, post = ring_problem("project")
    sde, model = VPSDE(), gm.eps_model(VPSDE())
    full = conditional_sample(model, sde, obs, 4, method="pigdm_2m", steps=5, generator=SampleNoise(7, torch.arange(4)), dtype=F64)
    alone = conditional_sample(model, sde, obs, 1, method="pigdm_2m", steps=5, generator=SampleNoise(7, torch.tensor([2])), dtype=F64)
    torch.testing.assert_close(alone.x[0], full.x[2])


def test_particle_filter_error_falls_with_particles():
    """Observing x_1 = 3.3 on the ring: the posterior puts 5 % on the narrow upper component, the
    proposal chain alone (1 particle) about 25 %; 16 particles correct it. Component-weight error
    (sum of absolute differences) of n = 500 draws: binomial noise ~0.02."""
    gm, sde = GaussianMixture.ring(), VPSDE()
    op = Mask.from_name("keep:0", (2,))
    obs = Observation(op, torch.tensor([3.3], dtype=F64), 0.0)
    post = gm.posterior(op, obs.y[0], 0.0)
    err = {}
    for p in (1, 16):
        x, nfe = smc_sample(gm.eps_model(sde), sde, obs, 500, particles=p, steps=30, generator=3, dtype=F64)
        assert nfe == 31 * p
        err[p] = float((component_weights(x, post) - post.weights).abs().sum())
    assert err[16] < 0.1 and err[1] > 3 * err[16], err


def test_particle_filter_output_does_not_depend_on_the_batch():
    gm, obs, post = ring_problem("project")
    sde, model = VPSDE(), gm.eps_model(VPSDE())
    full, _ = smc_sample(model, sde, obs, 4, particles=4, steps=5, generator=SampleNoise(7, torch.arange(4)), dtype=F64)
    alone, _ = smc_sample(model, sde, obs, 1, particles=4, steps=5, generator=SampleNoise(7, torch.tensor([2])), dtype=F64)
    torch.testing.assert_close(alone[0], full[2])


def test_repaint_schedule_and_cost():
    path = repaint_schedule(10, 3, 2)
    assert path[0] == 10 and path[-1] == 0
    assert all(abs(a - b) == 1 for a, b in zip(path[:-1], path[1:]))
    # levels 0, 3, 6 (< 10 - 3) each send the walk up 3 levels once: 10 + 3 * 3 down moves
    assert sum(1 for a, b in zip(path[:-1], path[1:]) if b < a) == 19
    assert repaint_nfe(10, 3, 2) == 20
    assert repaint_schedule(10, 3, 1) == list(range(10, -1, -1))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm_solver", "dpmpp_2m_sde"])
def test_replacement_hook_puts_y_in_the_observed_pixels(sampler):
    """Image-shaped data (B, C, H, W): the hook after the last step puts alpha_t y + std_t z there; at
    t = 0 (a final denoise reported at t = 0) or with the output's own replacement, y exactly."""
    gm = GaussianMixture(torch.randn(3, 1, 4, 4, dtype=F64), [0.3, 0.4, 0.5])
    sde = VPSDE()
    op = Mask.from_name("lower", (1, 4, 4))
    truth = gm.sample(2, torch.Generator().manual_seed(0))
    obs = Observation(op, op(truth[:1])[0], 0.0)
    noise = SampleNoise(0, torch.arange(2))
    x = solvers.sample(gm.eps_model(sde), sde, (2, 1, 4, 4), sampler=sampler, steps=20, generator=noise, dtype=F64,
                       state_hook=ReplacementHook(obs), denoise_final=False).x
    t_min = sde.t_min
    a, s = float(sde.alpha(torch.tensor(t_min))), float(sde.std(torch.tensor(t_min)))
    assert float((op(x) - a * op(truth[:1])).abs().max()) < 6 * s  # alpha y plus noise of scale std
    res = conditional_sample(gm.eps_model(sde), sde, obs, 2, method="replacement", sampler=sampler, steps=20,
                             generator=0, dtype=F64)
    torch.testing.assert_close(op(res.x), op(truth[:1]).expand(2, -1))


# ---------------------------------------------------------------------------------------------
# classifier guidance
# ---------------------------------------------------------------------------------------------
def test_exact_classifier_guidance_at_scale_one_is_the_component_model():
    gm, sde = GaussianMixture.ring(), VPSDE()
    guided = ClassifierGuidance(gm.eps_model(sde), MixtureClassifier(gm, sde), sde, scale=1.0)
    x = 3 * torch.randn(50, 2, dtype=F64)
    t = torch.rand(50, dtype=F64) * 0.95 + 0.02
    for k in (0, 5):
        comp = GaussianMixture(gm.means[k : k + 1], gm.stds[k : k + 1], torch.ones(1, dtype=F64))
        torch.testing.assert_close(guided(x, t, y=torch.full((50,), k)), comp.eps(sde, x, t))
    # and so samples of component 5, by any sampler
    comp = GaussianMixture(gm.means[5:6], gm.stds[5:6], torch.ones(1, dtype=F64))
    res = solvers.sample(guided, sde, (500, 2), sampler="ddim", steps=50, generator=0, dtype=F64,
                         model_kwargs={"y": torch.full((500,), 5)})
    _close_to(res.x, comp, far_from=gm.sample(500, torch.Generator().manual_seed(0)))


def test_a_trained_noisy_classifier_learns_the_responsibilities():
    gm, sde = GaussianMixture.ring(k=4, radius=3.0, std=0.4, unequal=False), VPSDE()
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(gm.weights, 4000, replacement=True, generator=g)
    x = gm.means[idx] + gm.stds[idx, None] * torch.randn(4000, 2, generator=g, dtype=F64)
    clf = train_classifier(NoisyClassifier((2,), 4, sde, hidden=64, depth=2), x.float(), idx, steps=600, seed=0)
    xt = 3 * torch.randn(400, 2)
    t = torch.rand(400) * 0.5 + 0.05
    with torch.no_grad():
        p = torch.softmax(clf(xt, t), 1)
    exact = torch.softmax(MixtureClassifier(gm, sde)(xt.double(), t.double()), 1)
    assert float((p - exact).abs().sum(1).mean()) < 0.15


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_error():
    gm, sde = GaussianMixture.ring(), VPSDE()
    model = gm.eps_model(sde)
    mask = Mask.from_name("keep:0", (2,))
    with pytest.raises(ValueError, match="y does not fit"):
        Observation(mask, torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="sigma_y"):
        Observation(mask, torch.zeros(1), -1.0)
    with pytest.raises(ValueError, match="expects x of shape"):
        Mask.from_name("lower", (1, 8, 8))(torch.zeros(2, 1, 4, 4))
    noisy = Observation(mask, torch.zeros(1), 0.1)
    for method in ("replacement", "repaint"):
        with pytest.raises(ValueError, match="noise-free"):
            conditional_sample(model, sde, noisy, 4, method=method, steps=3)
    with pytest.raises(ValueError, match="needs noisy"):
        conditional_sample(model, sde, Observation(mask, torch.zeros(1), 0.0), 4, method="dps", steps=3)
    with pytest.raises(ValueError, match="unknown method"):
        conditional_sample(model, sde, noisy, 4, method="magic", steps=3)
    with pytest.raises(ValueError, match="particles"):
        smc_sample(model, sde, noisy, 2, particles=0, steps=3)


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_app():
    import typer

    from cli.condition import register

    app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def root() -> None:  # a group, as in the real app
        pass

    register(app)
    return app


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny U-Net on (1, 8, 8) saved as a checkpoint (the CLI's plumbing, not quality)."""
    from scoresde.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
    from scoresde.networks import model_from_config

    cfg = {"arch": "unet", "in_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
           "attn_resolutions": [], "dropout": 0.0, "num_classes": None, "embedding": "sinusoidal"}
    net = model_from_config(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": cfg, "sde_config": VPSDE().config(), "model": net.state_dict(),
                           "ema": None, "config": {"dataset": "digits"}, "step": 0})
    return path


def test_cli_inpaint_writes_png_and_tensors(cli_app, tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner
    import numpy as np

    out = tmp_path / "inp.png"
    r = CliRunner().invoke(cli_app, ["inpaint", str(tiny_checkpoint), "--no-ema", "--count", "2", "-n", "2", "--steps", "3",
                                     "--resamplings", "2", "--jump-length", "1", "--device", "cpu", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    blob = np.load(out.with_suffix(".npz"))
    assert blob["samples"].shape == (2, 2, 1, 8, 8) and blob["x"].shape == (2, 1, 8, 8)
    # the observed upper half is the truth's
    np.testing.assert_allclose(blob["samples"][:, :, :, :4], np.repeat(blob["x"][:, None, :, :4], 2, 1), atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--sigma-y", "-0.5"], "sigma-y must be >= 0"),
    (["--method", "replacement", "--sigma-y", "0.1"], "noise-free"),
    (["--method", "dps"], "needs noisy"),
    (["--operator", "colorize"], "colour"),
    (["--mask", "diagonal"], "unknown mask"),
])
def test_cli_bad_input_is_one_error_line(cli_app, tiny_checkpoint, tmp_path, args, message):
    from typer.testing import CliRunner

    r = CliRunner().invoke(cli_app, ["inpaint", str(tiny_checkpoint), "--no-ema", "--count", "1", "-n", "1", "--steps", "2",
                                     "--device", "cpu", "-q", "-o", str(tmp_path / "x.png")] + args)
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.output


def test_cli_mask_file_of_the_wrong_shape(cli_app, tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner
    import numpy as np

    np.save(tmp_path / "m.npy", np.ones((4, 4)))
    r = CliRunner().invoke(cli_app, ["inpaint", str(tiny_checkpoint), "--no-ema", "--count", "1", "-n", "1", "--steps", "2",
                                     "--device", "cpu", "-q", "--mask", str(tmp_path / "m.npy"), "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "mask" in r.output and "shape" in r.output, r.output


@pytest.mark.parametrize("sampler, knobs", [("ddim", dict(steps=50, eta=1.0)), ("dpm_solver", dict(steps=20)),
                                            ("euler_maruyama", dict(steps=100))])
def test_replacement_hook_works_with_other_samplers(sampler, knobs):
    gm, obs, post = ring_problem("impute")
    sde = VPSDE()
    n = 400
    res = conditional_sample(gm.eps_model(sde), sde, obs, n, method="replacement", sampler=sampler, generator=1, dtype=F64, **knobs)
    h = default_bandwidth(post)
    assert mmd2(res.x, post, h).mmd2 < 0.25 * mmd2(gm.sample(n, torch.Generator().manual_seed(2)), post, h).mmd2
    torch.testing.assert_close(obs.operator(res.x), obs.y.expand(n, 1))


def test_cli_train_classifier_writes_a_loadable_classifier(cli_app, tmp_path):
    from typer.testing import CliRunner

    from scoresde.conditioning import NoisyClassifier

    out = tmp_path / "clf.pt"
    r = CliRunner().invoke(cli_app, ["train-classifier", "--steps", "5", "--hidden", "16", "--depth", "1", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    blob = torch.load(out, weights_only=True)
    cfg = dict(blob["config"])
    assert cfg["num_classes"] == 10 and cfg["in_shape"] == [1, 8, 8]
    clf = NoisyClassifier(cfg["in_shape"], cfg["num_classes"], VPSDE(), hidden=cfg["hidden"], depth=cfg["depth"])
    clf.load_state_dict(blob["state_dict"])
    assert clf(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5)).shape == (2, 10)


@pytest.mark.parametrize("method", ["pigdm", "smc", "repaint", "pigdm_2m"])
def test_one_observation_per_sample(method):
    """y of shape (B, M): sample i conditions on y_i (the observed coordinate lands on it)."""
    gm, sde = GaussianMixture.ring(), VPSDE()
    op = Mask.from_name("keep:0", (2,))
    y = torch.tensor([[-3.0], [0.0], [2.6], [3.5]], dtype=F64)
    knobs = dict(particles=4) if method == "smc" else {}
    res = conditional_sample(gm.eps_model(sde), sde, Observation(op, y, 0.0), 4, method=method, steps=40, generator=0,
                             dtype=F64, **knobs)
    assert torch.all((res.x[:, 0] - y[:, 0]).abs() < 0.05), (res.x[:, 0], y[:, 0])


def test_replacement_with_a_sampler_without_hook_is_an_error():
    gm, obs, post = ring_problem("impute")
    sde = VPSDE()
    with pytest.raises(ValueError, match="state hook"):
        conditional_sample(gm.eps_model(sde), sde, obs, 4, method="replacement", sampler="ode", steps=3)
