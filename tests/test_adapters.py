"""Adapters: the exact mixture written in every convention comes back as the exact eps, and samples
through each adapter equal the eps route."""

import math

import pytest
import torch

import solvers
from scoresde import GaussianMixture, VPSDE, adapters, ddpm
from scoresde._tensor import append_dims

GM = GaussianMixture.ring(k=6, radius=3.0, std=0.4)


def _times(sde, n):
    return torch.linspace(0.05 * sde.T, sde.T, n, dtype=torch.float64)


def _scales(sde, t, ndim):
    return append_dims(sde.alpha(t), ndim), append_dims(sde.std(t), ndim)


def exact_denoiser(y, sigma):
    """E[x0 | y] for y = x0 + sigma eps, x0 ~ GM: per component ``mu + s^2/(s^2+sigma^2)(y - mu)``,
    weighted by the posterior responsibilities (written independently of GaussianMixture.score)."""
    mu, s2, w = GM.means, GM.stds**2, GM.weights  # (K, D), (K,), (K,)
    v = s2[None] + sigma[:, None] ** 2  # (B, K)
    diff = y[:, None, :] - mu[None]  # (B, K, D)
    logr = torch.log(w)[None] - 0.5 * y.shape[1] * torch.log(v) - 0.5 * diff.pow(2).sum(-1) / v
    r = torch.softmax(logr, 1)
    comp = mu[None] + (s2[None] / v)[..., None] * diff
    return (r[..., None] * comp).sum(1)


def nets(sde):
    """prediction -> network in that convention, all exact for GM under ``sde``."""

    def eps(x, t):
        return GM.eps(sde, x, t)

    def x0(x, t):
        return GM.denoise(sde, x, t)

    def v(x, t):
        a, s = _scales(sde, t, x.ndim)
        return a * GM.eps(sde, x, t) - s * GM.denoise(sde, x, t)

    def score(x, t):
        return GM.score(sde, x, t)

    def denoiser(y, sigma):
        return exact_denoiser(y, sigma)

    def edm(inp, t, sd=0.7):
        sigma = sde.sigma(t)
        c_skip, c_out, c_in = adapters.edm_scalings(sigma[:, None], sd)
        y = inp / c_in
        return (exact_denoiser(y, sigma) - c_skip * y) / c_out

    return {"eps": eps, "x0": x0, "v": v, "score": score, "denoiser": denoiser, "edm": edm}


CONVENTIONS = ["eps", "x0", "v", "score", "denoiser", "edm"]


def _wrap(name, sde):
    return adapters.as_eps_model(nets(sde)[name], sde, name, sigma_data=0.7)


@pytest.mark.parametrize("name", CONVENTIONS)
def test_each_convention_gives_the_exact_eps(sde, name):
    t = _times(sde, 40)
    x = GM.marginal(sde, 0.5).sample(40, torch.Generator().manual_seed(1)) * 1.5
    want = GM.eps(sde, x, t)
    torch.testing.assert_close(_wrap(name, sde)(x, t), want, rtol=0, atol=1e-10)


def _discrete_net(abar, learned_variance=False, prediction="eps"):
    """net(x, timestep) exact at the noise level of the (piecewise log-linear) discrete schedule."""
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)])

    def net(x, timestep, **_):
        i = timestep.to(torch.float64) + 1
        lo = i.floor().long().clamp(max=len(abar) - 1)
        la = log_abar[lo] + (i - lo) * (log_abar[lo + 1] - log_abar[lo])
        a, s = torch.exp(0.5 * la)[:, None], torch.sqrt(-torch.expm1(la))[:, None]
        # an SDE-free exact eps: the mixture at x_t = a x0 + s eps
        mu, s2, w = GM.means, GM.stds**2, GM.weights
        var = a**2 * s2[None] + s**2  # (B, K)
        diff = x[:, None, :] - a[:, None] * mu[None]
        logr = torch.log(w)[None] - 0.5 * x.shape[1] * torch.log(var) - 0.5 * diff.pow(2).sum(-1) / var
        r = torch.softmax(logr, 1)
        eps = s * (r[..., None] * diff / var[..., None]).sum(1)
        out = eps if prediction == "eps" else (x - s * eps) / a if prediction == "x0" else a * eps - s * (x - s * eps) / a
        if learned_variance:
            out = torch.cat([out, torch.randn_like(out) * 7.0], dim=1)
        return out

    return net


@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("which", ["vp", "discrete"])
def test_discrete_networks_give_the_exact_eps(which, prediction, learned_variance):
    abar = ddpm.alphas_cumprod(ddpm.linear_betas())
    sde = ddpm.vpsde_from_ddpm() if which == "vp" else ddpm.DiscreteVPSDE(abar)
    model = adapters.as_eps_model(_discrete_net(abar, learned_variance, prediction), sde, prediction, discrete=True,
                                  alphas_cumprod=abar)
    t = torch.linspace(0.02, 1.0, 30, dtype=torch.float64)
    x = 2 * torch.randn(30, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x, t), GM.eps(sde, x, t), rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
@pytest.mark.parametrize("name", CONVENTIONS + ["ddpm", "ddpm_learned_variance"])
def test_samples_through_an_adapter_equal_the_eps_route(name, sampler):
    sde = VPSDE()
    if name.startswith("ddpm"):
        abar = ddpm.alphas_cumprod(ddpm.ddpm_betas_from_sde(sde))
        model = ddpm.DDPMEpsAdapter(_discrete_net(abar, name.endswith("variance")), sde, abar)
    else:
        model = _wrap(name, sde)
    kw = dict(sampler=sampler, steps=20, generator=3, dtype=torch.float64)
    ref = solvers.sample(GM.eps_model(sde), sde, (64, 2), **kw).x
    got = solvers.sample(model, sde, (64, 2), **kw).x
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)


def test_a_float32_network_in_float64_gets_one_clear_error():
    net = torch.nn.Linear(2, 2)
    sde = VPSDE()
    for model in (adapters.as_eps_model(lambda x, t: net(x), sde), adapters.as_eps_model(_Lin(), sde, "x0"),
                  adapters.as_eps_model(_Lin(), sde, "edm"), ddpm.DDPMEpsAdapter(_Lin(), sde)):
        if isinstance(model.net if hasattr(model, "net") else None, torch.nn.Module):
            with pytest.raises(ValueError, match="float32 but the input x is torch.float64"):
                model(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64))
    # same dtype: no error
    adapters.as_eps_model(_Lin(), sde, "v")(torch.zeros(3, 2), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="torch.float64 but the input x is torch.float32"):
        adapters.as_eps_model(_Lin().double(), sde, "v")(torch.zeros(3, 2), torch.full((3,), 0.5))


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t, **_):
        return self.lin(x)


def test_unknown_prediction_is_named():
    with pytest.raises(ValueError, match="unknown prediction 'noize'"):
        adapters.as_eps_model(_Lin(), VPSDE(), "noize")
    assert adapters.canonical_prediction("v_prediction") == "v"
    assert adapters.canonical_prediction("sample") == "x0"
    assert adapters.canonical_prediction("epsilon") == "eps"


def test_eps_and_output_conversions_invert(sde):
    t = _times(sde, 8)
    x = torch.randn(8, 3, 2, dtype=torch.float64)
    eps = torch.randn_like(x)
    for p in ("eps", "x0", "v", "score"):
        out = adapters.eps_to_output(eps, x, sde, t, p)
        torch.testing.assert_close(adapters.output_to_eps(out, x, sde, t, p), eps, rtol=1e-12, atol=1e-12)


def test_static_clipping_clips_the_x0_estimate(sde):
    model = GM.eps_model(sde)
    clipped = adapters.ClipX0(model, sde, clip=1.5)
    t = _times(sde, 30)
    x = 4 * torch.randn(30, 2, dtype=torch.float64)
    a, s = _scales(sde, t, 2)
    x0 = (x - s * model(x, t)) / a
    x0c = (x - s * clipped(x, t)) / a
    torch.testing.assert_close(x0c, x0.clamp(-1.5, 1.5), rtol=0, atol=1e-10)


def test_dynamic_thresholding_follows_saharia():
    sde = VPSDE()
    p = 0.9
    x0 = torch.cat([0.5 * torch.randn(1, 400), 3.0 * torch.randn(1, 400)]).double()  # one quiet, one loud sample
    t = torch.full((2,), 0.3, dtype=torch.float64)
    a, s = _scales(sde, t, 2)
    eps_true = torch.randn_like(x0)
    x = a * x0 + s * eps_true

    def oracle(x_, t_):  # an eps model whose x0 estimate is x0 exactly
        return eps_true

    out = adapters.ClipX0(oracle, sde, percentile=p)(x, t)
    x0c = (x - s * out) / a
    quiet_s = torch.quantile(x0[0].abs(), p)
    assert quiet_s < 1  # s = max(1, quantile) = 1: plain clipping
    torch.testing.assert_close(x0c[0], x0[0].clamp(-1, 1), rtol=0, atol=1e-10)
    # the loud sample is thresholded at its p-quantile and rescaled into [-1, 1]
    assert float(x0c[1].abs().max()) == pytest.approx(1.0, abs=1e-10)
    saturated = float((x0c[1].abs() > 1 - 1e-9).double().mean())
    assert abs(saturated - (1 - p)) < 0.01
    loud_s = torch.quantile(x0[1].abs(), p)
    inside = x0[1].abs() < loud_s
    torch.testing.assert_close(x0c[1][inside], x0[1][inside] / loud_s, rtol=0, atol=1e-10)


def test_clipped_sampling_stays_in_range():
    sde = VPSDE()
    model = adapters.ClipX0(GM.eps_model(sde), sde, clip=1.0)
    res = solvers.sample(model, sde, (64, 2), sampler="ddim", steps=20, generator=0, dtype=torch.float64,
                         keep_trajectory=True)
    # every x0 estimate the sampler formed is inside the clip range (the ring's points lie at radius 3);
    # entries of states without an estimate may be NaN placeholders
    d = res.denoised[torch.isfinite(res.denoised)]
    assert d.numel() >= 19 * 64 * 2 and float(d.abs().max()) <= 1.0 + 1e-9
    plain = solvers.sample(GM.eps_model(sde), sde, (64, 2), sampler="ddim", steps=20, generator=0,
                           dtype=torch.float64, keep_trajectory=True)
    assert float(plain.denoised[torch.isfinite(plain.denoised)].abs().max()) > 2.0


def test_discrete_adapter_refuses_bad_schedules():
    with pytest.raises(ValueError, match="strictly decreasing"):
        adapters.DiscreteTimeAdapter(_Lin(), VPSDE(), torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="2C = 4 output channels"):
        adapters.DiscreteTimeAdapter(lambda x, i: torch.zeros(x.shape[0], 3), VPSDE(), learned_variance=True)(
            torch.zeros(2, 2), torch.full((2,), 0.5))


def test_wrappers_expose_the_network_attributes():
    net = _Lin()
    net.config = {"arch": "lin"}
    for model in (adapters.as_eps_model(net, VPSDE(), "v"), adapters.as_eps_model(net, VPSDE(), "edm"),
                  adapters.ClipX0(adapters.as_eps_model(net, VPSDE(), "x0"), VPSDE())):
        assert model.config == {"arch": "lin"}
        assert list(model.parameters()) == list(net.parameters())
        with pytest.raises(AttributeError):
            model.not_there
