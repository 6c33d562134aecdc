"""eps / score / x0 / v conversions: inverse pairs and agreement with the exact mixture."""

import torch

from scoresde import GaussianMixture, parameterization as P


def _state(sde, shape=(6, 3, 2, 2)):
    x0 = torch.randn(shape, dtype=torch.float64)
    eps = torch.randn(shape, dtype=torch.float64)
    t = torch.linspace(0.05, sde.T, shape[0], dtype=torch.float64)
    a = P.append_dims(sde.alpha(t), len(shape))
    s = P.append_dims(sde.std(t), len(shape))
    return x0, eps, t, a * x0 + s * eps


def test_round_trips(sde):
    x0, eps, t, x = _state(sde)
    torch.testing.assert_close(P.eps_to_x0(x, eps, sde, t), x0)
    torch.testing.assert_close(P.x0_to_eps(x, x0, sde, t), eps)
    torch.testing.assert_close(P.score_to_eps(P.eps_to_score(eps, sde, t), sde, t), eps)
    torch.testing.assert_close(P.score_to_x0(x, P.eps_to_score(eps, sde, t), sde, t), x0)
    v = P.eps_to_v(x, eps, sde, t)
    torch.testing.assert_close(P.v_to_eps(x, v, sde, t), eps)
    torch.testing.assert_close(P.v_to_x0(x, v, sde, t), x0)


def test_v_definition(sde):
    x0, eps, t, x = _state(sde)
    a = P.append_dims(sde.alpha(t), x.ndim)
    s = P.append_dims(sde.std(t), x.ndim)
    torch.testing.assert_close(P.eps_to_v(x, eps, sde, t), a * eps - s * x0)


def test_score_function_and_denoiser_wrappers_match_the_exact_mixture(sde):
    gm = GaussianMixture.ring()
    model = gm.eps_model(sde)
    x = torch.randn(9, 2, dtype=torch.float64) * 3
    t = torch.linspace(0.02, sde.T, 9, dtype=torch.float64)
    torch.testing.assert_close(P.score_fn_from_eps(model, sde)(x, t), gm.score(sde, x, t))
    torch.testing.assert_close(P.Denoiser(model, sde)(x, t), gm.denoise(sde, x, t))
    back = P.eps_model_from_score(lambda x, t: gm.score(sde, x, t), sde)
    torch.testing.assert_close(back(x, t), model(x, t))
    # a scalar time is broadcast to the (B,) contract
    torch.testing.assert_close(P.ScoreFunction(model, sde)(x, 0.5 * sde.T), gm.score(sde, x, torch.full((9,), 0.5 * sde.T, dtype=torch.float64)))
