"""Losses against closed forms: Gaussian data make the optimal eps and its residual error exact.

For data ``N(m, s^2 I)`` and ``x_t = alpha x0 + std eps``, the optimal predictor is
``E[eps | x_t]`` and the per-dimension residual variance is ``q(t) = alpha^2 s^2 / (alpha^2 s^2 + std^2)``;
the exact-model loss at time t is ``q(t)`` and the time-averaged losses are integrals of it, which we
compute by quadrature independently of the code under test. Monte-Carlo tolerances are five
standard errors estimated from the very samples being averaged.
"""

import math

import numpy as np
import pytest
import torch

from scoresde import GaussianMixture, VPSDE
from scoresde.ddpm import alphas_cumprod, linear_betas, vpsde_from_ddpm
from scoresde.losses import DenoisingLoss, ddpm_loss, dsm_loss, likelihood_weight

S = 0.5  # data std
DIM = 4


def gaussian():
    return GaussianMixture.gaussian(torch.full((DIM,), 0.3, dtype=torch.float64), S)


def q_exact(sde, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    a2, s2 = sde.alpha(t) ** 2, sde.std(t) ** 2
    return a2 * S**2 / (a2 * S**2 + s2)


def g2_over_std2(sde, t):
    # w(t) from the forward SDE's own diffusion coefficient (independent of log_snr)
    _, g = sde.sde(torch.zeros(t.shape + (1,), dtype=t.dtype), t)
    return g**2 / sde.std(t) ** 2


def quad_grid(sde, t_min, n=20001):
    # geometric grid: w(t) ~ 1/t near t = 0 for VP-type SDEs
    return torch.logspace(math.log10(t_min), math.log10(sde.T), n, dtype=torch.float64)


def trapz(y, x):
    return float(torch.trapezoid(y, x))


def mean_and_se(v):
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def test_likelihood_weight_is_minus_dlambda_dt(sde):
    # w = g^2/std^2 must equal -d lambda/dt for every linear SDE (central differences, h = 1e-6).
    t = torch.linspace(0.05, sde.T - 0.05, 11, dtype=torch.float64)
    h = 1e-6
    fd = -(sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(likelihood_weight(sde, t), fd, rtol=1e-6, atol=0)


def test_exact_model_loss_at_fixed_time_is_residual_variance(sde):
    data, loss = gaussian(), DenoisingLoss(sde)
    g = torch.Generator().manual_seed(1)
    for tv in (0.05, 0.3, 0.8):
        n = 8000
        x0 = data.sample(n, generator=g)
        t = torch.full((n,), tv, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        per = loss.per_sample(data.eps_model(sde), x0, t, eps)
        m, se = mean_and_se(per)
        assert abs(m - float(q_exact(sde, tv))) < 5 * se, (tv, m, float(q_exact(sde, tv)), se)


def test_minimiser_is_the_exact_eps():
    # Adding a constant c to the exact eps raises the loss by c^2 (the cross term has mean zero).
    sde, data, loss = VPSDE(), gaussian(), DenoisingLoss(VPSDE())
    g = torch.Generator().manual_seed(2)
    n, c = 20000, 0.3
    x0 = data.sample(n, generator=g)
    t, _ = loss.sample_t(n, generator=g)
    t = t.double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    exact = data.eps_model(sde)
    base = loss.per_sample(exact, x0, t, eps)
    shifted = loss.per_sample(lambda x, tt: exact(x, tt) + c, x0, t, eps)
    m, se = mean_and_se(shifted - base)
    assert abs(m - c * c) < 5 * se + 1e-12


@pytest.mark.parametrize("weighting,importance", [("none", False), ("likelihood", False), ("likelihood", True), ("none", True)])
def test_time_averaged_loss_matches_quadrature(sde, weighting, importance):
    # Target: (1/(T - t_min)) int target_w(t) q(t) dt, target_w = 1 or w/w_bar; every (weighting,
    # sampling) pair is an unbiased estimator of its own target.
    t_min = 1e-2  # keeps the variance of the uniform-t likelihood estimator moderate (w ~ 1/t)
    loss = DenoisingLoss(sde, weighting, importance, t_min=t_min)
    tq = quad_grid(sde, t_min)
    w = g2_over_std2(sde, tq)
    w_bar = trapz(w, tq) / (sde.T - t_min)
    target_w = w / w_bar if weighting == "likelihood" else torch.ones_like(w)
    expected = trapz(target_w * q_exact(sde, tq), tq) / (sde.T - t_min)

    data, g, n = gaussian(), torch.Generator().manual_seed(3), 40000
    x0 = data.sample(n, generator=g)
    t, weight = loss.sample_t(n, generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    per = loss.per_sample(data.eps_model(sde), x0, t.double(), eps, weight.double())
    m, se = mean_and_se(per)
    assert abs(m - expected) < 5 * se, (m, expected, se)
    # the normalising integral Z = lambda(t_min) - lambda(T) agrees with the quadrature of w (the
    # trapezoid rule on 20001 points is good to ~2e-5 relative even for the cosine SDE, whose w
    # grows like 1/(1 - t) near T)
    assert loss.weight_integral == pytest.approx(trapz(w, tq), rel=1e-4)


def test_importance_sampled_times_follow_the_weight(sde):
    # Kolmogorov-Smirnov distance between drawn t and the CDF of w(t) by quadrature; the 0.1% critical
    # value for n samples is 1.95/sqrt(n).
    loss = DenoisingLoss(sde, "likelihood", importance_sampling=True)
    n = 20000
    t, weight = loss.sample_t(n, generator=torch.Generator().manual_seed(4))
    assert bool(torch.all(weight == 1))
    assert float(t.min()) >= loss.t_min and float(t.max()) <= sde.T
    tq = quad_grid(sde, loss.t_min)
    w = g2_over_std2(sde, tq)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (w[1:] + w[:-1]) * torch.diff(tq), 0)])
    cdf = cdf / cdf[-1]
    ts = torch.sort(t.double()).values
    model_cdf = torch.from_numpy(np.interp(ts.numpy(), tq.numpy(), cdf.numpy()))
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((emp_hi - model_cdf).abs(), (emp_hi - 1 / n - model_cdf).abs()).max())
    assert ks < 1.95 / math.sqrt(n), ks


def test_ddpm_loss_is_the_continuous_loss_at_grid_times():
    # abar_i = alpha(t_i)^2 exactly, so with the same step and noise both losses coincide.
    sde, data = VPSDE(), gaussian()
    g = torch.Generator().manual_seed(5)
    x0 = data.sample(64, generator=g)
    steps = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    model = data.eps_model(sde)
    d = ddpm_loss(model, sde, x0, timesteps=steps, eps=eps)
    c = DenoisingLoss(sde).per_sample(model, x0, (steps.double() + 1) / 1000, eps)
    torch.testing.assert_close(d, c, rtol=1e-9, atol=1e-12)


def test_ddpm_loss_with_given_schedule_matches_discrete_average():
    # DDPM's own linear schedule: the exact-model loss averages q at the times where alpha^2 = abar_i.
    sde, data = vpsde_from_ddpm(), gaussian()
    abar = alphas_cumprod(linear_betas())
    q = abar * S**2 / (abar * S**2 + 1 - abar)
    g = torch.Generator().manual_seed(6)
    n = 20000
    per = ddpm_loss(data.eps_model(sde), sde, data.sample(n, generator=g), alphas_cumprod=abar, generator=g)
    m, se = mean_and_se(per)
    assert abs(m - float(q.mean())) < 5 * se


def test_dsm_loss_trains_a_linear_model_to_the_optimum():
    # On Gaussian data at one fixed time the optimal eps is affine in x_t: eps* = std (x - alpha m) / v.
    # A learnable affine model trained with the loss reaches that map (the loss's minimiser).
    sde, data = VPSDE(), gaussian()
    tv = 0.4
    torch.manual_seed(0)
    lin = torch.nn.Linear(DIM, DIM).double()
    opt = torch.optim.Adam(lin.parameters(), lr=3e-2)
    loss = DenoisingLoss(sde)
    g = torch.Generator().manual_seed(7)
    for _ in range(300):
        x0 = 0.3 + S * torch.randn(512, DIM, generator=g, dtype=torch.float64)
        t = torch.full((512,), tv, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss.per_sample(lambda x, tt: lin(x), x0, t, eps).mean().backward()
        opt.step()
    a, s = float(sde.alpha(torch.tensor(tv))), float(sde.std(torch.tensor(tv)))
    v = a * a * S * S + s * s
    # SGD noise at lr 3e-2 with batch 512 leaves ~1e-2 jitter in the weights; 0.05 is far below the
    # optimum's own scale (std/v ~ 1.1 on the diagonal).
    torch.testing.assert_close(lin.weight.detach(), torch.eye(DIM, dtype=torch.float64) * s / v, atol=0.05, rtol=0)
    torch.testing.assert_close(lin.bias.detach(), torch.full((DIM,), -s * a * 0.3 / v, dtype=torch.float64), atol=0.05, rtol=0)


def test_dsm_loss_one_call_and_bad_input():
    sde = VPSDE()
    x0 = torch.randn(8, 2)
    out = dsm_loss(lambda x, t: torch.zeros_like(x), sde, x0, generator=torch.Generator().manual_seed(0))
    assert out.ndim == 0 and torch.isfinite(out)
    with pytest.raises(ValueError, match="weighting"):
        DenoisingLoss(sde, weighting="snr")
    with pytest.raises(ValueError, match="t_min"):
        DenoisingLoss(sde, t_min=2.0)
    with pytest.raises(ValueError, match="timesteps"):
        ddpm_loss(lambda x, t: x, sde, x0, timesteps=torch.full((8,), 1000))


# -- training targets: eps, x0, v and EDM --------------------------------------------------------
def _exact_net(gm, sde, prediction, sigma_data=0.5):
    """The exact network of Gaussian-mixture data in the convention the target trains."""
    from scoresde import adapters

    if prediction == "edm":
        def net(inp, t):
            sigma = sde.sigma(t)[:, None]
            c_skip, c_out, c_in = adapters.edm_scalings(sigma, sigma_data)
            y = inp / c_in
            d = gm.denoise(sde, y * sde.alpha(t)[:, None], t)
            return (d - c_skip * y) / c_out
        return net

    def net(x, t):
        return adapters.eps_to_output(gm.eps(sde, x, t), x, sde, t, prediction)

    return net


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_exact_model_loss_of_each_target_is_its_residual_variance(prediction):
    """Gaussian data N(m, S^2 I), fixed t: the exact network's loss is the posterior variance of the
    target, per dimension: eps: a^2 S^2 / V; x0: S^2 s^2 / V times min(SNR, 5); v: (a^2 + s^2)^2 S^2 / V;
    EDM: S^2 (sigma^2 + sd^2) / (sd^2 (S^2 + sigma^2)), with V = a^2 S^2 + s^2, sigma = s / a."""
    sde, sd = VPSDE(), 0.8
    gm = GaussianMixture.gaussian(torch.full((3,), 0.7), S)
    loss = DenoisingLoss(sde, prediction=prediction, sigma_data=sd)
    n = 40_000
    g = torch.Generator().manual_seed(0)
    for tv in (0.05, 0.3, 0.8):
        t = torch.full((n,), tv, dtype=torch.float64)
        x0 = gm.sample(n, g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        per = loss.per_sample(_exact_net(gm, sde, prediction, sd), x0, t, eps)
        a, s = float(sde.alpha(torch.tensor(tv))), float(sde.std(torch.tensor(tv)))
        V, sig = a * a * S * S + s * s, s / a
        want = {"eps": a * a * S * S / V, "x0": S * S * s * s / V * min(a * a / (s * s), 5.0),
                "v": (a * a + s * s) ** 2 * S * S / V,
                "edm": S * S * (sig**2 + sd**2) / (sd**2 * (S * S + sig**2))}[prediction]
        se = float(per.std()) / math.sqrt(n)
        assert float(per.mean()) == pytest.approx(want, abs=5 * se), (tv, float(per.mean()), want)


def test_edm_noise_levels_are_log_normal():
    sde = VPSDE()
    loss = DenoisingLoss(sde, prediction="edm")
    t, w = loss.sample_t(20_000, generator=torch.Generator().manual_seed(0))
    assert bool((w == 1).all())
    ln_sigma = torch.log(sde.sigma(t.double()))
    # clamping to [t_min, T] moves only the tails (P(ln sigma < ln sigma(t_min) = -4.6) = 0.3 %)
    assert float(ln_sigma.median()) == pytest.approx(-1.2, abs=0.03)
    q16, q84 = torch.quantile(ln_sigma, torch.tensor([0.1587, 0.8413], dtype=ln_sigma.dtype)).tolist()
    assert q16 == pytest.approx(-2.4, abs=0.05) and q84 == pytest.approx(0.0, abs=0.05)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="prediction must be one of"):
        DenoisingLoss(VPSDE(), prediction="score")
    with pytest.raises(ValueError, match="brings its own noise distribution"):
        DenoisingLoss(VPSDE(), weighting="likelihood", prediction="edm")
    with pytest.raises(ValueError, match="sigma_data"):
        DenoisingLoss(VPSDE(), prediction="edm", sigma_data=0.0)


# -- training with each target, wrapped back to eps at load ------------------------------------------
def _mix4():
    ang = torch.arange(4, dtype=torch.float64) * (math.pi / 2)
    return GaussianMixture(2.0 * torch.stack([ang.cos(), ang.sin()], 1), torch.tensor([0.3, 0.4, 0.5, 0.6]),
                           torch.tensor([0.1, 0.2, 0.3, 0.4]))


def _train_toy(tmp_path, prediction, steps, hidden=64):
    from scoresde.data import Dataset
    from scoresde.training import TrainConfig, train

    mix = _mix4()
    data = Dataset(x=mix.sample(8000, generator=torch.Generator().manual_seed(0)).float(), y=None,
                   num_classes=None, name="mix4", is_image=False)
    cfg = TrainConfig(dataset="gmm", model="mlp", model_kwargs={"hidden": hidden, "depth": 3}, steps=steps,
                      batch_size=256, lr=3e-3, warmup=min(50, steps), ema_decay=0.99, out_dir=str(tmp_path / prediction),
                      num_samples=0, log_every=max(1, steps // 4), max_minutes=None, device="cpu",
                      prediction=prediction, sigma_data=1.5)
    return train(cfg, progress=False, dataset=data), mix


@pytest.mark.parametrize("prediction, wrapper", [("eps", "MLP"), ("x0", "PredictionAdapter"), ("v", "PredictionAdapter"),
                                                 ("edm", "EDMPreconditioner")])
def test_each_target_is_recorded_and_wrapped_back_to_eps_at_load(tmp_path, prediction, wrapper):
    from scoresde import adapters
    from scoresde.checkpoint import load_checkpoint, load_model, save_checkpoint

    res, _ = _train_toy(tmp_path, prediction, steps=4, hidden=16)
    model, sde, cfg = load_model(res.final_checkpoint)
    assert cfg["prediction"] == prediction and type(model).__name__ == wrapper
    x, t = torch.randn(5, 2), torch.linspace(0.1, 0.9, 5)
    net = getattr(model, "net", model)
    with torch.no_grad():
        want = adapters.as_eps_model(net, sde, prediction, sigma_data=1.5)(x, t)
        torch.testing.assert_close(model(x, t), want)
    # a checkpoint written before the field existed loads as eps: the raw network
    state = load_checkpoint(res.final_checkpoint)
    del state["config"]["prediction"], state["config"]["sigma_data"]
    save_checkpoint(tmp_path / "old.pt", state)
    old, _, _ = load_model(tmp_path / "old.pt")
    assert type(old).__name__ == "MLP"


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_each_target_trains_to_the_mixture(tmp_path, prediction):
    """400 MLP steps on a 2-D mixture of four Gaussians (weights 0.1..0.4, widths 0.3..0.6, means on a
    circle of radius 2): the samples' mean, mode weights and the widths of the three heavier modes
    match the exact law. About 5-10 s of CPU per target."""
    import solvers
    from scoresde.checkpoint import load_model

    res, mix = _train_toy(tmp_path, prediction, steps=400)
    model, sde, _ = load_model(res.final_checkpoint)
    n = 4000
    with torch.no_grad():
        x = solvers.sample(model, sde, (n, 2), sampler="heun", steps=20, generator=1).x.double()
    # mean (-0.4, -0.4); the sample mean of exact draws has standard error ~0.03
    assert float((x.mean(0) - mix.mean()).abs().max()) < 0.15
    # mode weights by nearest mean: chi2 ~ 3 +- 2.5 for exact samples; a missed mode gives >= 400
    k = torch.cdist(x, mix.means).argmin(1)
    counts = torch.bincount(k, minlength=4).double()
    chi2 = float(((counts - n * mix.weights) ** 2 / (n * mix.weights)).sum())
    assert chi2 < 100, (chi2, counts.tolist())
    # widths: median distance to the nearest mean over the exact median sqrt(2 ln 2) width; measured
    # at 400 steps 0.66-1.37 over the targets (x0 narrowest), a blurred or collapsed model gives > 2 or < 0.3
    r = (x - mix.means[k]).norm(dim=1) / mix.stds[k]
    for j in (1, 2, 3):
        ratio = float(r[k == j].median()) / math.sqrt(2 * math.log(2))
        assert 0.55 < ratio < 1.6, (j, ratio)
