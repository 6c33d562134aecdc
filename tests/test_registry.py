"""The sampler registry, typed options, the shared step driver (state hook) and the model contract checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import solvers
from scoresde import GaussianMixture, VESDE, VPSDE
from solvers import GridOptions, Sampler, SamplerOptions, knob

F64 = torch.float64
HOOKED = sorted(name for name, record in solvers.SAMPLERS.items() if record.supports_hook)
FIXED_STEP = [n for n in sorted(solvers.SAMPLERS) if issubclass(solvers.SAMPLERS[n].options_type, GridOptions)]


def _steps(name: str) -> dict:
    """A few steps for every sampler (the adaptive ode chooses its own)."""
    return {} if name == "ode" else {"steps": 4}


@dataclasses.dataclass(frozen=True)
class ToyOptions(GridOptions):
    shrink: float = knob(1.0, "multiply the state by this after every step")


def toy(run, steps, opts):
    """Deterministic Euler on the probability-flow ODE in sigma, then a shrink: a sampler written
    outside the package with only the public pieces."""
    sde = run.sde
    t = opts.grid(sde, steps)
    sig = sde.sigma(t).tolist()
    alpha = sde.alpha(t).tolist()
    y = run.x / alpha[0]
    for i in run.steps(steps, "toy"):
        eps = run.eps(alpha[i] * y, float(t[i]))
        y = (y + (sig[i + 1] - sig[i]) * eps) * opts.shrink
        y = run.report(i, float(t[i + 1]), y, None, scale=alpha[i + 1], t_prev=float(t[i]))
    return alpha[-1] * y


@pytest.fixture
def toy_registered():
    record = solvers.register(Sampler("toy_euler", toy, ToyOptions, 5, False, summary="test sampler"))
    yield record
    solvers.REGISTRY.pop("toy_euler", None)


def test_default_sampler_is_one_and_the_same_everywhere():
    import inspect

    from scoresde.training import TrainConfig
    from scoresde_cli.app import sample as cli_sample

    assert inspect.signature(solvers.sample).parameters["sampler"].default == solvers.DEFAULT_SAMPLER
    assert inspect.signature(cli_sample).parameters["sampler"].default.default == solvers.DEFAULT_SAMPLER
    assert TrainConfig().sampler == solvers.DEFAULT_SAMPLER


def test_every_record_is_typed_and_its_defaults_validate():
    for name, record in solvers.SAMPLERS.items():
        assert record.name == name and issubclass(record.options_type, SamplerOptions)
        opts = record.options()
        assert dataclasses.is_dataclass(opts) and opts.as_dict() == record.defaults()
        with pytest.raises(dataclasses.FrozenInstanceError):
            opts.denoise_final = False  # type: ignore[misc]


@pytest.mark.parametrize("knobs,error,needle", [
    ({"bogus": 1}, TypeError, "unknown option(s) ['bogus']"),
    ({"eta": "half"}, ValueError, "eta must be a finite number"),
    ({"eta": float("nan")}, ValueError, "eta must be a finite number"),
    ({"eta": 2.0}, ValueError, "eta must be a number in [0, 1]"),
    ({"denoise_final": 1}, ValueError, "denoise_final must be True or False"),
    ({"schedule": "nope"}, ValueError, "schedule must be one of"),
    ({"t_min": -1.0}, ValueError, "t_min must be positive"),
])
def test_options_are_checked_in_one_place(knobs, error, needle):
    with pytest.raises(error) as info:
        solvers.SAMPLERS["ddim"].options(knobs)
    assert needle in str(info.value)
    # the same check whichever door the knobs come in by
    with pytest.raises(error):
        solvers.sample(lambda x, t: x, VPSDE(), (2, 2), sampler="ddim", steps=2, **knobs)


def test_ints_become_floats_and_lists_tuples():
    opts = solvers.SAMPLERS["dpm_solver"].options({"window": [1, 5]})
    assert opts.window == (1.0, 5.0) and all(isinstance(v, float) for v in opts.window)
    assert isinstance(solvers.SAMPLERS["ddim"].options(eta=1).eta, float)


def test_register_refuses_clashes_and_untyped_records(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        solvers.register(toy_registered)
    with pytest.raises(TypeError, match="SamplerOptions"):
        solvers.register(Sampler("untyped", toy, dict, 5, False))  # type: ignore[arg-type]


def test_a_sampler_registered_from_outside_runs_through_sample(toy_registered):
    sde = VPSDE()
    gm = GaussianMixture.gaussian(torch.tensor([0.5, -1.0], dtype=F64), 0.7)
    res = solvers.sample(gm.eps_model(sde), sde, (6, 2), sampler="toy_euler", generator=1, dtype=F64)
    assert res.nfe == 5 and res.x.shape == (6, 2)
    # Euler in sigma is DDIM with eta = 0 (first-order exponential integrator in y = x / alpha)
    ref = solvers.sample(gm.eps_model(sde), sde, (6, 2), sampler="ddim", steps=5, generator=1, dtype=F64,
                         denoise_final=False)
    torch.testing.assert_close(res.x, ref.x, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="unknown option"):
        solvers.sample(gm.eps_model(sde), sde, (6, 2), sampler="toy_euler", eta=0.1)
    with pytest.raises(ValueError, match="shrink must be a finite number"):
        solvers.sample(gm.eps_model(sde), sde, (6, 2), sampler="toy_euler", shrink="x")


@pytest.mark.parametrize("name", HOOKED)
def test_state_hook_sees_every_step_and_its_replacement_is_kept(name):
    sde = VESDE() if name == "langevin" else VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    seen = []

    def hook(step):
        seen.append((step.index, step.t, step.t_prev))
        assert step.x.shape == (5, 2) and step.sde is sde
        z0, z1 = step.noise(), step.noise(1)
        assert z0.shape == (5, 2) and not torch.equal(z0, z1)
        return torch.full_like(step.x, 0.25)  # replace the state by a constant

    kw = {"denoise_final": False, **_steps(name)}
    res = solvers.sample(model, sde, (5, 2), sampler=name, generator=3, dtype=F64, state_hook=hook, **kw)
    indices = [i for i, _, _ in seen]
    assert indices[-1] == (kw.get("steps", 4) - 1) and set(indices) == set(range(indices[-1] + 1))
    ts = [t for i, t, _ in seen if i == indices[-1]]
    assert ts[-1] == pytest.approx(sde.t_min)
    # the state after the last step is what the hook returned
    torch.testing.assert_close(res.x, torch.full_like(res.x, 0.25), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", HOOKED)
def test_identity_hook_leaves_samples_unchanged(name):
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    a = solvers.sample(model, sde, (5, 2), sampler=name, generator=3, dtype=F64, **_steps(name)).x
    b = solvers.sample(model, sde, (5, 2), sampler=name, generator=3, dtype=F64,
                       state_hook=lambda step: step.x.clone(), **_steps(name)).x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_mid_run_replacement_continues_from_the_new_state():
    # DDIM (eta = 0) from a replaced state at t_1 equals DDIM started there on the rest of the grid
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    grid = solvers.time_grid(sde, 6)
    z = 0.3 * torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    hooked = solvers.sample(model, sde, (4, 2), sampler="ddim", steps=6, generator=1, dtype=F64,
                            state_hook=lambda s: z.clone() if s.index == 0 else None).x
    rest = solvers.sample(model, sde, x_T=z, sampler="ddim", steps=5, t_grid=grid[1:]).x
    torch.testing.assert_close(hooked, rest, rtol=1e-12, atol=1e-12)


def test_ode_refuses_a_state_hook():
    with pytest.raises(ValueError, match="cannot act on the state"):
        solvers.sample(lambda x, t: x, VPSDE(), (2, 2), sampler="ode", state_hook=lambda s: None)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_every_fixed_step_sampler_takes_an_explicit_grid(name):
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    steps = 4
    kw = {"method": "rk4"} if name == "ode" else {}
    schedule = solvers.SAMPLERS[name].defaults()["schedule"]
    extra = {"sigma_lo": 0.5, "sigma_hi": 10.0} if schedule == "window" else {}
    grid = solvers.time_grid(sde, steps, schedule, **extra)
    a = solvers.sample(model, sde, (3, 2), sampler=name, steps=steps, generator=2, dtype=F64, **kw).x
    b = solvers.sample(model, sde, (3, 2), sampler=name, steps=steps, generator=2, dtype=F64, t_grid=grid, **kw).x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps \\+ 1"):
        solvers.sample(model, sde, (3, 2), sampler=name, steps=steps + 1, t_grid=grid, **kw)


@pytest.mark.parametrize("name", sorted(solvers.SAMPLERS))
def test_model_output_of_the_wrong_shape_is_refused(name):
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"model returned shape \(3, 1\) for x of shape \(3, 2\)"):
        solvers.sample(lambda x, t: x[:, :1], sde, (3, 2), sampler=name, **_steps(name))


@pytest.mark.parametrize("name", sorted(solvers.SAMPLERS))
def test_empty_or_integer_x_T_is_refused(name):
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    with pytest.raises(ValueError, match="must not be empty"):
        solvers.SAMPLERS[name](model, sde, torch.zeros(0, 2), **_steps(name))
    with pytest.raises(ValueError, match="floating-point"):
        solvers.SAMPLERS[name](model, sde, torch.zeros(3, 2, dtype=torch.long), **_steps(name))
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        solvers.SAMPLERS[name](model, sde, torch.zeros(3, 2), steps=0)


@pytest.mark.parametrize("name", ["ancestral", "pc", "sde"])
def test_a_replacement_at_the_final_denoise_is_kept(name):
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    last = {}

    def hook(step):
        last["index"], last["t"] = step.index, step.t
        return torch.full_like(step.x, -0.5) if step.t == 0.0 else None

    res = solvers.sample(model, sde, (3, 2), sampler=name, steps=3, generator=0, dtype=F64, state_hook=hook)
    assert last == {"index": 3, "t": 0.0}
    assert torch.equal(res.x, torch.full_like(res.x, -0.5))


def test_a_float32_network_sampled_in_float64_gets_one_clear_error():
    from scoresde.networks import build_model

    net = build_model("tiny", data_shape=(1, 8, 8)).eval()
    with pytest.raises(ValueError, match="parameters are torch.float32 but the input x is torch.float64"):
        solvers.sample(net, VPSDE(), (2, 1, 8, 8), sampler="ddim", steps=2, dtype=F64)
