"""GaussianMixture: the ground truth must itself be right (autograd, scipy, closed forms)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import scoresde
from scoresde import GaussianMixture


def mixtures():
    return {
        "ring2d": GaussianMixture.ring(),
        "random16d": GaussianMixture.random(16, k=5, seed=3),
        "image": GaussianMixture(torch.randn(3, 1, 2, 3, dtype=torch.float64), [0.3, 0.5, 0.2], [0.2, 0.5, 0.3]),
    }


def scipy_log_prob(means, stds, weights, x):
    """Independent reference: scipy's multivariate normal on flattened data."""
    x = x.reshape(len(x), -1).numpy()
    mu = means.reshape(len(means), -1).numpy()
    comps = [
        math.log(w) + stats.multivariate_normal(m, s**2 * np.eye(mu.shape[1])).logpdf(x)
        for m, s, w in zip(mu, stds.numpy(), weights.numpy())
    ]
    return logsumexp(np.stack(comps, 1), axis=1)


@pytest.mark.parametrize("name", ["ring2d", "random16d", "image"])
def test_log_prob_matches_scipy(name):
    gm = mixtures()[name]
    x = gm.sample(50, torch.Generator().manual_seed(0)) + 0.3 * torch.randn(50, *gm.event_shape, dtype=torch.float64)
    np.testing.assert_allclose(gm.log_prob(x).numpy(), scipy_log_prob(gm.means, gm.stds, gm.weights, x), rtol=1e-10)


@pytest.mark.parametrize("name", ["ring2d", "random16d", "image"])
def test_marginal_log_prob_matches_scipy_with_convolved_components(name, sde):
    gm = mixtures()[name]
    t = torch.tensor(0.4 * sde.T, dtype=torch.float64)
    a, s = float(sde.alpha(t)), float(sde.std(t))
    x = gm.sample(40, torch.Generator().manual_seed(1)) * a + s * torch.randn(40, *gm.event_shape, dtype=torch.float64)
    ref = scipy_log_prob(a * gm.means, torch.sqrt(a**2 * gm.stds**2 + s**2), gm.weights, x)
    np.testing.assert_allclose(gm.marginal_log_prob(sde, x, t.expand(40)).numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("name", ["ring2d", "random16d", "image"])
def test_score_is_gradient_of_marginal_log_prob(name, sde):
    gm = mixtures()[name]
    n = 30
    x = (3 * torch.randn(n, *gm.event_shape, dtype=torch.float64)).requires_grad_(True)
    t = torch.rand(n, dtype=torch.float64) * sde.T * 0.98 + 0.01
    grad = torch.autograd.grad(gm.marginal_log_prob(sde, x, t).sum(), x)[0]
    torch.testing.assert_close(gm.score(sde, x.detach(), t), grad, rtol=1e-9, atol=1e-10)


def test_eps_model_and_denoiser_for_a_single_gaussian(sde):
    """Posterior mean of x0 given x_t for N(mu, s^2): mu + alpha s^2 / (alpha^2 s^2 + std^2) (x - alpha mu)."""
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.6
    gm = GaussianMixture.gaussian(mu, s)
    x = torch.randn(7, 2, dtype=torch.float64)
    t = torch.linspace(0.1, sde.T, 7, dtype=torch.float64)
    a, sd = sde.alpha(t)[:, None], sde.std(t)[:, None]
    x0 = mu + a * s**2 / (a**2 * s**2 + sd**2) * (x - a * mu)
    torch.testing.assert_close(gm.denoise(sde, x, t), x0)
    eps = gm.eps_model(sde)(x, t)
    torch.testing.assert_close(eps, (x - a * x0) / sd)
    # the model contract: extra inputs are accepted and ignored
    torch.testing.assert_close(gm.eps_model(sde)(x, t, y=torch.zeros(7, dtype=torch.long)), eps)


def test_sample_moments():
    """Mean and covariance of 100k draws against the mixture's moments: mean SE ~ sqrt(var/n)."""
    gm = GaussianMixture.ring()
    n = 100_000
    x = gm.sample(n, torch.Generator().manual_seed(5))
    mean = sum(w * m for w, m in zip(gm.weights, gm.means))
    cov = gm.covariance()
    se = torch.sqrt(torch.diag(cov) / n)
    assert torch.all((x.mean(0) - mean).abs() < 5 * se)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.03, atol=0.03)
    # component frequencies: binomial errors
    d = torch.cdist(x, gm.means)
    freq = torch.bincount(d.argmin(1), minlength=gm.num_components) / n
    assert torch.all((freq - gm.weights).abs() < 5 * torch.sqrt(gm.weights * (1 - gm.weights) / n) + 1e-3)


def test_sample_and_scores_in_float32():
    gm = GaussianMixture.ring()
    sde = scoresde.VPSDE()
    x = gm.sample(16, dtype=torch.float32)
    assert x.dtype == torch.float32
    out = gm.eps_model(sde)(x, torch.full((16,), 0.5))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0], weights=[0.5, 0.6]), "weights"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0], weights=[1.5, -0.5]), "weights"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 0.0]), "stds"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0, 1.0]), "stds"),
        (dict(means=[0.0, 1.0], stds=[1.0, 1.0]), "means"),
    ],
)
def test_bad_mixture_parameters_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        GaussianMixture(**kwargs)


def test_wrong_event_shape_is_reported():
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(torch.zeros(3, 3, dtype=torch.float64))
