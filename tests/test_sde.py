"""The forward SDEs against their closed forms, their own calculus, and simulation."""

import math

import numpy as np
import pytest
import torch
import torchsde

import scoresde
from scoresde import CosineVPSDE, SubVPSDE, VESDE, VPSDE

from scoresde.sde import SDES as ALL_SDES


def grid(sde, n=9, dtype=torch.float64):
    return torch.linspace(0.0, sde.T, n, dtype=dtype)


# -- closed forms -------------------------------------------------------------------------------
def test_vp_alpha_std_closed_form():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = grid(sde)
    log_a = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    torch.testing.assert_close(sde.alpha(t), torch.exp(log_a), rtol=1e-14, atol=0)
    torch.testing.assert_close(sde.alpha(t) ** 2 + sde.std(t) ** 2, torch.ones_like(t), rtol=1e-14, atol=1e-14)


def test_cosine_is_variance_preserving_with_nichol_dhariwal_abar():
    s = 0.008
    sde = CosineVPSDE(s=s)
    t = grid(sde)
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(sde.alpha(t) ** 2, abar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sde.alpha(t) ** 2 + sde.std(t) ** 2, torch.ones_like(t), rtol=1e-12, atol=1e-12)


def test_subvp_std_is_one_minus_alpha_squared():
    sde, vp = SubVPSDE(), VPSDE()
    t = grid(sde)
    torch.testing.assert_close(sde.alpha(t), vp.alpha(t))
    torch.testing.assert_close(sde.std(t), 1 - vp.alpha(t) ** 2, rtol=1e-12, atol=1e-15)
    assert bool(torch.all(sde.std(t[1:]) < vp.std(t[1:])))


def test_ve_closed_form():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    t = grid(sde)
    torch.testing.assert_close(sde.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(sde.std(t), 0.01 * (50.0 / 0.01) ** t, rtol=1e-13, atol=0)
    _, g = sde.sde(torch.zeros(len(t), 1, dtype=torch.float64), t)
    torch.testing.assert_close(g, sde.std(t) * math.sqrt(2 * math.log(50.0 / 0.01)), rtol=1e-13, atol=0)


# -- calculus: drift and diffusion are consistent with the marginals -----------------------------
def test_f_and_g2_are_derivatives_of_the_marginal(sde):
    """f = d log alpha / dt and g^2 = d std^2/dt - 2 f std^2 (the variance ODE of a linear SDE)."""
    t = torch.linspace(0.05, sde.T * 0.97, 11, dtype=torch.float64, requires_grad=True)
    log_a = sde.log_alpha(t)
    var = sde.std(t) ** 2
    dlog_a = torch.autograd.grad(log_a.sum(), t, retain_graph=True)[0]
    dvar = torch.autograd.grad(var.sum(), t)[0]
    t = t.detach()
    x = torch.ones(len(t), 3, dtype=torch.float64)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(drift[:, 0], dlog_a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g**2, dvar - 2 * dlog_a * var.detach(), rtol=1e-8, atol=1e-9)


def test_log_snr_is_decreasing_and_inverted(sde):
    t = torch.linspace(sde.t_min, sde.T, 50, dtype=torch.float64)
    lam = sde.log_snr(t)
    assert bool(torch.all(lam[1:] < lam[:-1]))
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sde.t_from_sigma(sde.sigma(t)), t, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(sde.sigma(t), sde.std(t) / sde.alpha(t))


def test_transition_composes_to_marginal(sde):
    """x_t | x_s composed with x_s | x_0 must give x_t | x_0 (mean scale and variance)."""
    s = torch.tensor([0.2, 0.4], dtype=torch.float64) * sde.T
    t = torch.tensor([0.5, 0.9], dtype=torch.float64) * sde.T
    ratio, std_st = sde.transition(s, t)
    torch.testing.assert_close(ratio * sde.alpha(s), sde.alpha(t))
    torch.testing.assert_close(ratio**2 * sde.std(s) ** 2 + std_st**2, sde.std(t) ** 2, rtol=1e-10, atol=1e-12)


# -- simulation: marginals against a fine forward simulation with torchsde ------------------------
class _Forward(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, sde):
        super().__init__()
        self.s = sde

    def f(self, t, y):
        return self.s.sde(y, t.expand(y.shape[0]))[0]

    def g(self, t, y):
        return self.s.sde(y[:1], t.reshape(1))[1].expand_as(y)


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_marginals_match_torchsde_simulation(name):
    """Gaussian data N(mu, s^2 I): simulate the forward SDE with torchsde and compare the mean and
    variance (pooled over the 16 i.i.d. coordinates) with alpha mu and alpha^2 s^2 + std^2.

    4000 paths x 16 coordinates = 64000 values. Monte-Carlo standard errors: mean sqrt(var/64000),
    variance var*sqrt(2/64000) (0.56% relative). Euler with dt = 1e-3 has a weak error in the
    variance below 1% here (the left-point sum of g^2 lags the integral by about |d log g^2/dt| dt / 2,
    largest for VE: 0.85%), so the tolerance is 5 standard errors plus 1%. A wrong beta by 10%
    (about 7% in std^2 at t = 0.25) or a missing sigma_min fails it.
    """
    torch.manual_seed(7)  # BrownianPath draws from the global generator
    sde = ALL_SDES[name]()
    n, d, mu, s = 4000, 16, 1.0, 0.5
    # x_0 carries std(0) of noise already (sigma_min for VE, 0 for VP-type).
    y0 = mu + math.sqrt(s**2 + float(sde.std(torch.tensor(0.0))) ** 2) * torch.randn(n, d, dtype=torch.float64)
    ts = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64) * sde.T
    bm = torchsde.BrownianPath(t0=0.0, w0=torch.zeros(n, d, dtype=torch.float64))
    ys = torchsde.sdeint(_Forward(sde), y0, ts, method="euler", dt=1e-3, bm=bm)
    for k in range(1, len(ts)):
        t = ts[k : k + 1]
        a, sd = float(sde.alpha(t)), float(sde.std(t))
        var = a**2 * s**2 + sd**2
        m_hat, v_hat = float(ys[k].mean()), float(ys[k].var())
        assert abs(m_hat - a * mu) < 5 * math.sqrt(var / (n * d)), (name, float(t), m_hat, a * mu)
        assert abs(v_hat / var - 1) < 5 * math.sqrt(2 / (n * d)) + 0.01, (name, float(t), v_hat, var)


# -- prior ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_prior_logp_integrates_to_one(name):
    sde = ALL_SDES[name]()
    r = 10 * sde.prior_std
    u = torch.linspace(-r, r, 801, dtype=torch.float64)
    p1 = torch.exp(sde.prior_logp(u[:, None]))
    assert abs(float(torch.trapezoid(p1, u)) - 1) < 1e-8
    xx, yy = torch.meshgrid(u[::4], u[::4], indexing="ij")
    p2 = torch.exp(sde.prior_logp(torch.stack([xx, yy], -1).reshape(-1, 2))).reshape(xx.shape)
    mass = torch.trapezoid(torch.trapezoid(p2, u[::4], dim=1), u[::4])
    assert abs(float(mass) - 1) < 1e-6


def test_prior_sample_moments_and_matches_marginal_at_T(sde):
    g = torch.Generator().manual_seed(0)
    z = sde.prior_sample((20000, 2), generator=g, dtype=torch.float64)
    assert abs(float(z.std()) / sde.prior_std - 1) < 0.02
    # the prior approximates the marginal at T of unit-variance data
    t = torch.tensor(sde.T, dtype=torch.float64)
    marg_var = float(sde.alpha(t)) ** 2 + float(sde.std(t)) ** 2
    assert abs(math.sqrt(marg_var) / sde.prior_std - 1) < 1e-3


# -- the reverse-time dynamics --------------------------------------------------------------------
def test_probability_flow_drift_for_gaussian_data_is_the_known_linear_field(sde):
    """For data N(mu, s^2 I), x_t = alpha mu + sqrt(v) z with v = alpha^2 s^2 + std^2, so the ODE
    that transports the marginals deterministically is dx/dt = alpha' mu + v'/(2v) (x - alpha mu).
    The derivatives come from autograd on alpha and std, not from f and g."""
    mu, s = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64), 0.8
    gm = scoresde.GaussianMixture.gaussian(mu, s)
    t = torch.linspace(0.05, sde.T * 0.95, 6, dtype=torch.float64, requires_grad=True)
    a = sde.alpha(t)
    v = a**2 * s**2 + sde.std(t) ** 2
    da = torch.autograd.grad(a.sum(), t, retain_graph=True)[0]
    dv = torch.autograd.grad(v.sum(), t)[0]
    t, a, v = t.detach(), a.detach()[:, None], v.detach()[:, None]
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    expected = da[:, None] * mu + (dv[:, None] / (2 * v)) * (x - a * mu)
    rev = sde.reverse(lambda x, t: gm.score(sde, x, t), probability_flow=True)
    drift, diffusion = rev.sde(x, t)
    torch.testing.assert_close(drift, expected, rtol=1e-8, atol=1e-10)
    assert bool(torch.all(diffusion == 0))


def test_reverse_sde_drift_and_diffusion(sde):
    gm = scoresde.GaussianMixture.ring()
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.3 * sde.T, dtype=torch.float64)
    f, g = sde.sde(x, t)
    drift, diffusion = sde.reverse(lambda x, t: gm.score(sde, x, t)).sde(x, t)
    torch.testing.assert_close(drift, f - g[:, None] ** 2 * gm.score(sde, x, t))
    torch.testing.assert_close(diffusion, g)


# -- shapes, dtypes, devices ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 2), (5, 3, 4, 4), (5, 1, 2, 3, 2)])
def test_broadcast_any_rank_dtype_and_device(sde, shape, dtype, device):
    x0 = torch.randn(shape, dtype=dtype, device=device)
    t = torch.rand(shape[0], dtype=dtype, device=device) * sde.T
    mean, std = sde.marginal(x0, t)
    assert mean.shape == x0.shape and std.shape == (shape[0],)
    assert mean.dtype == dtype and mean.device.type == device.type
    drift, g = sde.sde(x0, t)
    assert drift.shape == x0.shape and g.shape == (shape[0],)
    assert sde.prior_logp(x0).shape == (shape[0],)
    z = sde.prior_sample(shape, device=device, dtype=dtype)
    assert z.shape == shape and z.dtype == dtype
    # per-sample scalars broadcast: sample i uses t_i
    i = 3
    torch.testing.assert_close(mean[i], sde.alpha(t[i : i + 1])[0] * x0[i])


def test_float_and_scalar_times_are_accepted(sde):
    x = torch.randn(3, 2)
    m1, s1 = sde.marginal(x, 0.5 * sde.T)
    m2, s2 = sde.marginal(x, torch.full((3,), 0.5 * sde.T))
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(s1.expand(3), s2)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_outside_range_names_t(sde, bad):
    with pytest.raises(ValueError, match=r"\bt\b must lie in"):
        sde.alpha(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match=r"\bt\b must lie in"):
        sde.marginal(torch.zeros(2, 2), torch.tensor([0.5, bad]))


@pytest.mark.parametrize(
    "factory, arg",
    [
        (lambda: VPSDE(beta_min=0.0), "beta_min"),
        (lambda: VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: VPSDE(beta_max=-2.0), "beta_max"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: SubVPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=10.0, sigma_max=1.0), "sigma_max"),
        (lambda: VESDE(sigma_max=float("inf")), "sigma_max"),
        (lambda: CosineVPSDE(s=-0.1), r"\bs\b"),
        (lambda: CosineVPSDE(T=1.0), r"\bT\b"),
        (lambda: VPSDE(T=0.0), r"\bT\b"),
    ],
)
def test_bad_parameters_name_the_argument(factory, arg):
    with pytest.raises(ValueError, match=arg):
        factory()


def test_config_round_trip(sde):
    rebuilt = scoresde.sde_from_config(sde.config())
    t = torch.linspace(0, sde.T, 5, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.std(t), sde.std(t))
    assert type(rebuilt) is type(sde)
    with pytest.raises(ValueError, match="unknown SDE"):
        scoresde.sde_from_config({"name": "nope"})


def test_time_horizon_other_than_one():
    sde = VPSDE(T=2.0)
    t = torch.tensor([1.9], dtype=torch.float64)
    assert np.isfinite(float(sde.std(t)))
    with pytest.raises(ValueError):
        sde.std(torch.tensor([2.1]))


# -- check_sde, the registry, the numeric inverse ---------------------------------------------
class _LinearVE(scoresde.SDE):
    """A user-written VE SDE: std(t) = sigma_max t + 0.01 (so g^2 = 2 std sigma_max), no closed-form
    inverse (the base class's numeric one is used)."""

    def __init__(self, sigma_max: float = 30.0, T: float = 1.0):
        self.sigma_max, self.T = sigma_max, T

    @property
    def prior_std(self):
        return self.sigma_max * self.T + 0.01

    def _log_alpha(self, t):
        return 0.0 * t

    def _std(self, t):
        return self.sigma_max * t + 0.01

    def _f(self, t):
        return 0.0 * t

    def _g2(self, t):
        return 2 * self.sigma_max * self._std(t)


def test_check_sde_accepts_every_builtin(sde):
    assert scoresde.check_sde(sde) is sde


def test_check_sde_accepts_a_user_sde_with_the_numeric_inverse():
    sde = scoresde.check_sde(_LinearVE())
    lam = sde.log_snr(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    # closed form: std = exp(-lambda/2) -> t = (std - 0.01) / sigma_max
    torch.testing.assert_close(sde.t_from_log_snr(lam), (torch.exp(-lam / 2) - 0.01) / 30.0, rtol=0, atol=1e-12)


class _WrongG2(scoresde.VPSDE):
    def _g2(self, t):
        return 0.5 * super()._g2(t)


class _WrongInverse(scoresde.VPSDE):
    def _t_from_log_snr(self, lam):
        return 0.9 * super()._t_from_log_snr(lam)


class _WrongPrior(scoresde.VESDE):
    prior_std = 1.0  # the VE marginal at T has std sigma_max = 50


class _WrongDrift(scoresde.VPSDE):
    def _f(self, t):
        return 2 * super()._f(t)


class _AlphaNotOne(scoresde.VPSDE):
    def _log_alpha(self, t):
        return super()._log_alpha(t) - 0.1


class _SignalLeft(scoresde.VPSDE):
    """beta_max = 1: alpha(T) = 0.74, the prior N(0, 1) ignores most of the signal."""

    def __init__(self):
        super().__init__(0.1, 1.0)


@pytest.mark.parametrize("bad, message", [
    (_WrongG2, "g\\^2"),
    (_WrongInverse, "t_from_log_snr is not the inverse"),
    (_WrongPrior, "prior_std=1 does not match std\\(T\\)=50"),
    (_WrongDrift, "drift f\\(t\\)"),
    (_AlphaNotOne, "alpha\\(0\\)"),
    (_SignalLeft, "signal is not drowned"),
])
def test_check_sde_names_each_planted_mistake(bad, message):
    with pytest.raises(ValueError, match=message):
        scoresde.check_sde(bad())


def test_register_sde_round_trips_a_custom_sde_through_its_config():
    from scoresde.sde import SDES

    assert "linear_ve_test" not in SDES
    try:
        scoresde.register_sde("linear_ve_test", _LinearVE)
        sde = _LinearVE(sigma_max=12.5)
        cfg = sde.config()
        assert cfg == {"name": "linear_ve_test", "sigma_max": 12.5, "T": 1.0}
        assert repr(sde) == "_LinearVE(sigma_max=12.5, T=1.0)"
        back = scoresde.sde_from_config(cfg)
        assert type(back) is _LinearVE and back.sigma_max == 12.5
        with pytest.raises(ValueError, match="already registered"):
            scoresde.register_sde("linear_ve_test", _WrongG2)
    finally:
        SDES.pop("linear_ve_test", None)
    with pytest.raises(ValueError, match="register a custom SDE"):
        scoresde.sde_from_config({"name": "linear_ve_test"})


def test_register_sde_refuses_non_sdes():
    with pytest.raises(ValueError, match="subclass of scoresde.SDE"):
        scoresde.register_sde("nope", dict)


def test_a_registered_subclass_of_a_builtin_round_trips_as_itself():
    from scoresde.sde import SDES

    class SlowVP(scoresde.VPSDE):
        pass

    try:
        scoresde.register_sde("slow_vp_test", SlowVP)
        cfg = SlowVP(beta_max=15.0).config()
        assert cfg["name"] == "slow_vp_test"
        back = scoresde.sde_from_config(cfg)
        assert type(back) is SlowVP and back.beta_max == 15.0
    finally:
        SDES.pop("slow_vp_test", None)
    assert scoresde.VPSDE().config()["name"] == "VPSDE"
