"""The DDPM bridge: discrete schedule <-> continuous VP SDE, and the network adapter."""

import types

import pytest
import torch

import scoresde
from scoresde import GaussianMixture, ddpm


def test_linear_schedule_matches_continuous_vp_to_the_documented_bound():
    """Module docstring: |abar_i - alpha(t_i)^2| <= 1e-3 and |log abar_i - log alpha(t_i)^2| <= 0.07
    for the linear schedule 1e-4..0.02, N = 1000, t_i = (i+1)/N. The lower bounds keep the stated
    numbers honest (a looser bound would let them drift)."""
    abar = ddpm.alphas_cumprod(ddpm.linear_betas(1000, 1e-4, 0.02))
    sde = ddpm.vpsde_from_ddpm(1000, 1e-4, 0.02)
    assert (sde.beta_min, sde.beta_max) == pytest.approx((0.1, 20.0))
    a2 = sde.alpha(ddpm.ddpm_times(1000)) ** 2
    abs_err = float((abar - a2).abs().max())
    log_err = float((abar.log() - a2.log()).abs().max())
    assert 5e-4 < abs_err <= 1e-3
    assert 0.03 < log_err <= 0.07
    # The log error is dominated by the second-order term of log(1 - beta) = -beta - beta^2/2 - ...,
    # which the continuous limit drops: it accumulates to sum_j beta_j^2 / 2. What remains is the
    # first-order mismatch of a Riemann sum against its integral (N vs N-1 in the slope), < 3e-3.
    second_order = 0.5 * torch.cumsum(ddpm.linear_betas() ** 2, 0)
    assert float((a2.log() - abar.log() - second_order).abs().max()) < 3e-3


def test_sde_to_betas_and_back_is_exact():
    sde = scoresde.VPSDE()
    betas = ddpm.ddpm_betas_from_sde(sde, 1000)
    abar = ddpm.alphas_cumprod(betas)
    torch.testing.assert_close(abar, sde.alpha(ddpm.ddpm_times(1000)) ** 2, rtol=1e-12, atol=1e-15)
    # and close to the linear schedule the SDE came from: beta_i = 1 - exp(-int beta) over one step is
    # beta(t_mid)/N - (beta/N)^2/2 + ..., off from the linear schedule by < slope/(2N) + 0.02^2/2 < 3e-4.
    lin = ddpm.linear_betas(1000)
    assert float((betas - lin).abs().max()) < 3e-4


def test_cosine_sde_discretises_too_and_ve_is_refused():
    betas = ddpm.ddpm_betas_from_sde(scoresde.CosineVPSDE(), 100)
    assert bool(torch.all((betas > 0) & (betas < 1)))
    with pytest.raises(ValueError, match="alpha"):
        ddpm.ddpm_betas_from_sde(scoresde.VESDE(), 100)


def _discrete_exact_net(gm, abar):
    """A 'DDPM network' that is exact for the discrete schedule: eps at fractional timestep i,
    with log abar interpolated linearly in i (abar_{-1} = 1). Returns diffusers-style output."""
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), abar.log()])

    def net(x, timestep, **kwargs):
        i = timestep.to(torch.float64) + 1
        lo = i.floor().long().clamp(max=len(abar) - 1)
        w = i - lo
        la = (1 - w) * log_abar[lo] + w * log_abar[lo + 1]
        a, s = torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))
        v = a[:, None] ** 2 * gm.stds**2 + s[:, None] ** 2  # (B, K)
        diff = x[:, None, :] - a[:, None, None] * gm.means  # (B, K, D)
        logj = gm.weights.log() - 0.5 * x.shape[1] * v.log() - 0.5 * diff.pow(2).sum(-1) / v
        r = torch.softmax(logj, 1)
        score = -(r / v)[..., None].mul(diff).sum(1)
        return types.SimpleNamespace(sample=-s[:, None] * score)

    return net


def test_adapter_runs_a_ddpm_network_at_the_right_noise_level():
    gm = GaussianMixture.ring()
    abar = ddpm.alphas_cumprod(ddpm.linear_betas())
    sde = ddpm.vpsde_from_ddpm()
    model = ddpm.DDPMEpsAdapter(_discrete_exact_net(gm, abar), sde, abar)
    t = torch.linspace(0.01, 1.0, 25, dtype=torch.float64)
    x = 2 * torch.randn(25, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x, t), gm.eps(sde, x, t), rtol=1e-8, atol=1e-9)
    # timestep <-> time round trip
    torch.testing.assert_close(model.time(model.timestep(t)), t, rtol=1e-9, atol=1e-12)
    i = torch.tensor([0.0, 10.0, 499.5, 990.0], dtype=torch.float64)
    torch.testing.assert_close(model.timestep(model.time(i)), i, rtol=1e-9, atol=1e-7)


def test_adapter_passes_model_inputs_through():
    seen = {}

    def net(x, timestep, class_labels=None):
        seen["labels"] = class_labels
        return (torch.zeros_like(x),)

    sde = scoresde.VPSDE()
    out = ddpm.DDPMEpsAdapter(net, sde)(torch.ones(2, 3), torch.tensor([0.5, 0.5]), class_labels=torch.tensor([1, 2]))
    assert out.shape == (2, 3) and seen["labels"].tolist() == [1, 2]


@pytest.mark.parametrize("kwargs", [dict(num_steps=1), dict(beta_start=0.0), dict(beta_start=0.1, beta_end=0.01)])
def test_bad_schedules_are_refused(kwargs):
    with pytest.raises(ValueError):
        ddpm.linear_betas(**kwargs)


# -- DiscreteVPSDE: the continuous SDE through a discrete schedule ----------------------------
def test_discrete_vpsde_passes_through_abar_and_checks_itself():
    abar = ddpm.alphas_cumprod(ddpm.linear_betas(200, 1e-3, 0.05))
    sde = ddpm.DiscreteVPSDE(abar)
    t_i = ddpm.ddpm_times(200)
    torch.testing.assert_close(sde.alpha(t_i) ** 2, abar, rtol=1e-13, atol=0)
    assert float(sde.alpha(torch.zeros(1, dtype=torch.float64))) == 1.0
    # log alpha^2 is linear between knots: the midpoint is the geometric mean
    mid = (t_i[:-1] + t_i[1:]) / 2
    torch.testing.assert_close(sde.alpha(mid) ** 2, torch.sqrt(abar[:-1] * abar[1:]), rtol=1e-12, atol=0)
    scoresde.check_sde(sde)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t_i)), t_i, rtol=0, atol=1e-12)
    assert sde.t_min == pytest.approx(1 / 200)
    back = scoresde.sde_from_config(sde.config())
    torch.testing.assert_close(back.alpha(mid), sde.alpha(mid), rtol=0, atol=0)
    assert "N=200" in repr(sde)


def test_discrete_vpsde_refuses_bad_schedules():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddpm.DiscreteVPSDE(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        ddpm.DiscreteVPSDE(torch.tensor([1.0, 0.5]))


def test_ddpm_adapter_on_the_discrete_sde_calls_integer_timesteps():
    seen = []

    def net(x, timestep):
        seen.append(timestep.clone())
        return torch.zeros_like(x)

    sde = ddpm.DiscreteVPSDE()
    model = ddpm.DDPMEpsAdapter(net, sde, torch.tensor(sde.alphas_cumprod, dtype=torch.float64))
    i = torch.tensor([0, 17, 500, 999])
    model(torch.zeros(4, 2, dtype=torch.float64), (i.double() + 1) / 1000)
    torch.testing.assert_close(seen[0], i.double(), rtol=0, atol=1e-9)
