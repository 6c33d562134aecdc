"""Model-calibrated time grids (solvers.calibrate) against exact mathematics.

Ground truth: for Gaussian data N(mu, s^2 I) the probability-flow ODE map is linear and known in
closed form (see tests/test_solvers_deterministic.py), so the endpoint error of a grid is exact.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import solvers
from scoresde import GaussianMixture, SubVPSDE, VESDE, VPSDE
from solvers.base import CountingModel
from solvers.calibrate import (
    CalibratedGrid, CalibrationSettings, CoefficientObjective, GridCache, Objective, Pilot, PilotSolver, Stratum, WarpFamily,
    as_triples, calibrate_grid, coordinate_descent, screen_knobs, select, validate, warp_grid,
)
from solvers.dpm_solver import RECORD as DPM_RECORD
from solvers.dpm_solver import integrate, plan
from solvers.levels import levels

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=20.0)}
# a deliberately coarse solver, so that grids differ measurably on a Gaussian
COARSE = {"order": 2, "corrector": False, "final_step": "dpm"}
MU, S = torch.tensor([0.7, -1.2, 0.3], dtype=F64), 0.8
DPM = solvers.SAMPLERS["dpm_solver"]


def gaussian_endpoint(sde, x_T):
    """Exact PF-ODE endpoint at t_min composed with Tweedie's x0 there, data N(MU, S^2 I)."""
    tt = torch.tensor([sde.T, sde.t_min], dtype=F64)
    a, sd = sde.alpha(tt), sde.std(tt)
    v = a**2 * S**2 + sd**2
    x = a[1] * MU + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * MU)
    return MU + a[1] * S**2 / v[1] * (x - a[1] * MU)


def fresh_noise(sde, n, seed=0):
    return sde.prior_std * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(scope="module", params=list(SDES))
def calibrated(request):
    sde = SDES[request.param]()
    model = GaussianMixture.gaussian(MU, S).eps_model(sde)
    grid = calibrate_grid(model, sde, (3,), steps=6, pilot_samples=128, typical_samples=64, at_risk=0.0, pilot_steps=60,
                          dtype=F64, **COARSE)
    return sde, model, grid


def test_grid_is_a_valid_time_grid(calibrated):
    sde, _, grid = calibrated
    t = torch.tensor(grid.t, dtype=F64)
    assert isinstance(grid, CalibratedGrid) and grid.steps == 6 and len(grid.t) == 7
    assert grid.t[0] == pytest.approx(sde.T, abs=1e-12) and grid.t[-1] == pytest.approx(sde.t_min, abs=1e-12)
    assert bool((t[1:] < t[:-1]).all())
    assert bool((sde.sigma(t)[1:] < sde.sigma(t)[:-1]).all())


def test_calibrated_grid_no_worse_than_default_on_fresh_noise(calibrated):
    """On a Gaussian (exact endpoint known) the fitted grid must not lose to the default grid on
    noise it never saw, and it must have improved the pilot's own error (it starts at the default)."""
    sde, model, grid = calibrated
    x_T = fresh_noise(sde, 400, seed=3)
    exact = gaussian_endpoint(sde, x_T)
    e_def = rms_(DPM(model, sde, x_T, steps=6, **COARSE), exact)
    e_cal = rms_(DPM(model, sde, x_T, steps=6, t_grid=grid, **COARSE), exact)
    assert grid.pilot_rms <= grid.default_rms
    assert e_cal <= 0.5 * e_def, (e_cal, e_def)  # measured ~100x lower on VP, sub-VP and VE
    # the pilot's default error is the same quantity as the fresh one (same solver, same law)
    assert grid.default_rms == pytest.approx(e_def, rel=0.5)


def test_validation_keeps_the_best_of_fit_half_fit_and_default(calibrated):
    """With every start of each half kept (at_risk = 0, typical_samples = half), the validation
    score is the plain mean over the second half: recomputed here against the same accurate solve
    (60 steps) that calibration uses as its reference."""
    from scoresde.noise import SampleNoise

    sde, model, grid = calibrated
    x_val = sde.prior_std * SampleNoise(grid.pilot_seed, torch.arange(128)).randn((3,), 0, dtype=F64)[64:]
    family = WarpFamily.around_default(sde, 6, DPM_RECORD.options(COARSE))  # its times: test_warp_family_times
    accurate = DPM(model, sde, x_val, steps=60, **COARSE)

    def err(knots, coefficients=None):
        return rms_(DPM(model, sde, x_val, steps=6, t_grid=family.times(knots), coefficients=coefficients, **COARSE), accurate)

    assert grid.accurate_samples == 128
    assert grid.validation_default_rms == pytest.approx(err([0.0] * len(grid.knots)), rel=1e-9)
    assert grid.validation_grid_rms == pytest.approx(err(grid.knots), rel=1e-9)
    assert grid.validation_rms == pytest.approx(err(grid.knots, grid.coefficients), rel=1e-9)
    assert grid.validation_rms <= grid.validation_grid_rms <= grid.validation_default_rms


def test_stratified_pilot_keeps_the_mode_switching_starts():
    """On a ring at 6 steps the error is carried by starts that switch mode. The screen must put
    them in the at-risk stratum: the stratified estimate of the default grid's error agrees with
    the plain mean over all the fit half's starts (computed here), though only 5 % + 100 of them
    were solved accurately."""
    from scoresde.noise import SampleNoise

    sde = VPSDE()
    model = GaussianMixture.ring(k=5, radius=3.0, std=0.1, unequal=True).eps_model(sde)
    grid = calibrate_grid(model, sde, (2,), steps=6, pilot_samples=4000, typical_samples=100, pilot_steps=100, max_sweeps=1,
                          dtype=F64)
    assert grid.accurate_samples == 2 * (100 + 100)
    x_fit = sde.prior_std * SampleNoise(grid.pilot_seed, torch.arange(2000)).randn((2,), 0, dtype=F64)
    accurate = DPM(model, sde, x_fit, steps=100)
    e = (DPM(model, sde, x_fit, steps=6) - accurate).pow(2).sum(1)
    assert (e > 1.0).sum() >= 5  # mode switches exist and dominate the error
    full = float(e.mean() / 2) ** 0.5
    assert grid.default_rms == pytest.approx(full, rel=0.1), (grid.default_rms, full)


def rms_(a, b):
    return float((a - b).pow(2).mean().sqrt())


def test_nfe_exact_and_batch_invariant(calibrated):
    sde, model, grid = calibrated
    res = solvers.sample(model, sde, (16, 3), sampler="dpm_solver", steps=6, generator=5, dtype=F64, t_grid=grid, **COARSE)
    assert res.nfe == 6
    one = solvers.sample(model, sde, (1, 3), sampler="dpm_solver", steps=6, generator=5, dtype=F64, t_grid=grid, **COARSE)
    torch.testing.assert_close(one.x[0], res.x[0], rtol=0, atol=1e-12)


def test_grid_does_not_depend_on_anything_but_its_arguments():
    """Two calibrations give the identical grid (fixed pilot seed, not the global RNG or a batch)."""
    sde = VPSDE()
    model = GaussianMixture.gaussian(MU, S).eps_model(sde)
    kw = dict(steps=5, pilot_samples=64, typical_samples=16, pilot_steps=40, max_sweeps=4, dtype=F64, **COARSE)
    a = calibrate_grid(model, sde, (3,), **kw)
    torch.manual_seed(123)
    torch.randn(10)
    b = calibrate_grid(model, sde, (3,), **kw)
    assert a.t == b.t and a.knots == b.knots
    c = calibrate_grid(model, sde, (3,), batch_size=7, **kw)  # chunked pilot: same numbers
    assert c.t == pytest.approx(a.t, abs=1e-12)


def test_pilot_cost_is_counted():
    sde = VPSDE()
    counted = CountingModel(GaussianMixture.gaussian(MU, S).eps_model(sde))
    evaluated = []

    def model(x, t):
        evaluated.append(x.shape[0])
        return counted(x, t)

    g = calibrate_grid(model, sde, (3,), steps=4, pilot_samples=40, typical_samples=8, pilot_steps=30, dtype=F64, **COARSE)
    assert counted.nfe == g.network_calls == len(evaluated)
    assert g.pilot_cost == sum(evaluated)
    # screen (2N + N + N + N steps on 40), accurate (30 steps on 2 x (1 + 8)), grids tried and their
    # validation's 3, the coefficient search's recorded start and the validation's 2 sets: all N steps
    # on the 9 of a half; each coefficient set tried reruns only the steps from the one it changes
    assert g.coefficients_tried > 0
    whole = 40 * 5 * 4 + 18 * 30 + 9 * 4 * (g.grids_tried + 3 + 1 + 2)
    assert whole + 9 * 1 * g.coefficients_tried <= g.pilot_cost < whole + 9 * 4 * g.coefficients_tried
    # the progress bar only reports: the same grid with it on
    shown = calibrate_grid(model, sde, (3,), steps=4, pilot_samples=40, typical_samples=8, pilot_steps=30, dtype=F64,
                           progress=True, **COARSE)
    assert shown.t == g.t and shown.grids_tried == g.grids_tried and shown.coefficients == g.coefficients


def test_warp_with_flat_density_is_the_default_grid():
    sde = VPSDE()
    fine = levels(sde, 400, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0)
    coarse = levels(sde, 10, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0)
    lam = warp_grid(fine.lam, [0.0] * 6, 10)
    assert lam == pytest.approx(coarse.lam, abs=2e-3)
    # a higher density in the middle moves points toward it, monotonically
    lam2 = warp_grid(fine.lam, [0.0, 0.0, 2.0, 2.0, 0.0, 0.0], 10)
    assert all(b > a for a, b in zip(lam2, lam2[1:]))
    assert lam2[0] == fine.lam[0] and lam2[-1] == fine.lam[-1]


def test_zero_knots_reproduce_the_default_sampler():
    sde = VPSDE()
    model = GaussianMixture.ring().eps_model(sde)
    x_T = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    lv = levels(sde, 8, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0)
    a = DPM(model, sde, x_T, steps=8)
    b = DPM(model, sde, x_T, steps=8, t_grid=lv.t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_mixture_calibration_beats_default_on_fresh_noise():
    """On a 2-D ring (well-separated, unequal modes) a calibrated 10-step grid fitted on a screen of
    16000 lowers the RMS endpoint error on 1000 other draws against the tight reference."""
    from solvers.reference import reference_solution

    sde = VPSDE()
    model = GaussianMixture.ring(k=5, radius=3.0, std=0.1, unequal=True).eps_model(sde)
    grid = calibrate_grid(model, sde, (2,), steps=10, pilot_samples=16000, dtype=F64)
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = reference_solution(model, sde, x_T)
    e_def = rms_(DPM(model, sde, x_T, steps=10), ref)
    e_cal = rms_(DPM(model, sde, x_T, steps=10, t_grid=grid), ref)
    assert e_cal < e_def, (e_cal, e_def)


def test_validation():
    sde = VPSDE()
    model = GaussianMixture.gaussian(MU, S).eps_model(sde)
    x_T = fresh_noise(sde, 2)
    lv = levels(sde, 4, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0)
    f = DPM
    with pytest.raises(ValueError, match="steps \\+ 1"):
        f(model, sde, x_T, steps=5, t_grid=lv.t)
    with pytest.raises(ValueError, match="decreasing"):
        f(model, sde, x_T, steps=4, t_grid=lv.t[::-1])
    with pytest.raises(ValueError, match=r"\(0, T"):
        f(model, sde, x_T, steps=4, t_grid=[1.5] + lv.t[1:])
    with pytest.raises(ValueError, match="t_min"):
        f(model, sde, x_T, steps=4, t_grid=lv.t, t_min=0.01)
    with pytest.raises(ValueError, match="interp"):
        f(model, sde, x_T, steps=4, t_grid=lv.t, interp="window")
    with pytest.raises(ValueError, match="schedule"):
        calibrate_grid(model, sde, (3,), steps=4, schedule="logsnr")
    with pytest.raises(TypeError, match="unknown"):
        calibrate_grid(model, sde, (3,), steps=4, nope=1)
    with pytest.raises(ValueError, match="steps"):
        calibrate_grid(model, sde, (3,), steps=1)
    with pytest.raises(ValueError, match="pilot_steps"):
        calibrate_grid(model, sde, (3,), steps=10, pilot_steps=5)


def test_grid_cache_fits_once_per_steps():
    sde = VPSDE()
    counted = CountingModel(GaussianMixture.gaussian(MU, S).eps_model(sde))
    cache = GridCache(counted, sde, (3,), pilot_samples=16, typical_samples=4, pilot_steps=20, dtype=F64, **COARSE)
    g = cache(4)
    n = counted.nfe
    assert cache(4) is g and counted.nfe == n
    assert cache(5).steps == 5 and counted.nfe > n
    assert "calibrate_grid" in dir(solvers) and solvers.calibrate_grid is calibrate_grid


def test_image_shaped_samples_give_the_grid_of_their_flattened_problem():
    """Calibration works on any sample rank: isotropic Gaussian data of shape (2, 3, 3) and the same
    data flattened to (18,) are one problem, drawn from the same per-element noise, so the fitted
    grids must be identical."""
    sde = VPSDE()
    mu = torch.linspace(-1.0, 1.0, 18, dtype=F64)
    flat = GaussianMixture.gaussian(mu, S).eps_model(sde)

    def image_model(x, t):
        return flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    kw = dict(steps=5, pilot_samples=64, typical_samples=16, pilot_steps=40, max_sweeps=3, dtype=F64, **COARSE)
    a = calibrate_grid(flat, sde, (18,), **kw)
    b = calibrate_grid(image_model, sde, (2, 3, 3), **kw)
    assert a.knots == b.knots and a.t == pytest.approx(b.t, abs=1e-12)
    assert b.validation_rms == pytest.approx(a.validation_rms, rel=1e-9)


def test_save_and_load_round_trip(calibrated, tmp_path):
    sde, model, grid = calibrated
    path = tmp_path / "grid.json"
    grid.save(path)
    back = CalibratedGrid.load(path)
    assert back == grid
    x_T = fresh_noise(sde, 8)
    a = DPM(model, sde, x_T, steps=6, t_grid=grid, **COARSE)
    b = DPM(model, sde, x_T, steps=6, t_grid=back, **back.knobs)
    assert torch.equal(a, b)
    (tmp_path / "bad.json").write_text('{"t": [1, 0]}')
    with pytest.raises(ValueError, match="not a calibrated grid"):
        CalibratedGrid.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        CalibratedGrid.load(tmp_path / "missing.json")


def _ring_problem(n=64, seed=0):
    sde = VPSDE()
    model = GaussianMixture.ring(k=5, radius=3.0, std=0.1, unequal=True).eps_model(sde)
    return sde, model, torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_unit_coefficients_are_the_solver_itself():
    sde, model, x_T = _ring_problem()
    f = DPM
    torch.testing.assert_close(f(model, sde, x_T, steps=8, coefficients=[(1.0, 1.0, 0.0)] * 8), f(model, sde, x_T, steps=8),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("knobs", [{}, {"shift_eval": True}, {"final_step": "dpm", "denoise_final": False}])
def test_resumed_run_is_bit_identical_to_the_full_run(knobs):
    """The coefficient search reruns only the steps from the one a set changes, from the states
    recorded by the run it departs from: that must be exactly (torch.equal) the full run."""
    from solvers.base import Run

    sde, model, x_T = _ring_problem()
    base = [(1.0, 1.0, 0.0)] * 8
    trace = []
    integrate(plan(sde, 8, **knobs, coefficients=base), Run(model, sde, x_T), x_T, trace=trace)
    assert len(trace) == 8
    for k, change in ((0, (1.5, 0.5, 0.1)), (3, (1.25, 1.0, 0.0)), (6, (0.75, 1.25, -0.2)), (7, (1.0, 1.0, 0.3))):
        coefs = list(base)
        coefs[k] = change
        plan_ = plan(sde, 8, **knobs, coefficients=coefs)
        again = list(trace[:k])
        resumed = integrate(plan_, Run(model, sde, x_T), x_T, resume=(k, trace[k]), trace=again)
        full_trace = []
        full = integrate(plan_, Run(model, sde, x_T), x_T, trace=full_trace)
        assert torch.equal(resumed, full)
        assert full.ne(integrate(plan(sde, 8, **knobs, coefficients=base), Run(model, sde, x_T), x_T)).any()
        assert len(again) == 8 and all(torch.equal(a.y, b.y) for a, b in zip(again, full_trace))


def test_zero_coefficients_are_ddim():
    """Predictor scale 0 leaves DDIM's step (D_i alone, exact for constant D) and corrector scale 0
    keeps the prediction, so order 3 with its corrector becomes first-order DPM-Solver++ = DDIM."""
    sde, model, x_T = _ring_problem()
    f = DPM
    b = f(model, sde, x_T, steps=8, final_step="dpm", order=1, corrector=False)
    for cap in (None, 2):  # a corrector_order cap drops the oldest node from the corrector, not from "no correction"
        a = f(model, sde, x_T, steps=8, final_step="dpm", corrector_order=cap, coefficients=[(0.0, 0.0, 0.0)] * 8)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and the coefficients do act: a predictor scale of 2 on every step is another solver
    c = f(model, sde, x_T, steps=8, coefficients=[(2.0, 1.0, 0.0)] * 8)
    assert (c - f(model, sde, x_T, steps=8)).abs().max() > 1e-3


def test_shift_moves_the_network_evaluation_to_sigma_e_shift():
    sde, model, x_T = _ring_problem(4)
    seen = []

    def spy(x, t):
        seen.append((float(t[0]), x.clone()))
        return model(x, t)

    shifts = [0.0, -0.3, 0.2, 0.0, 0.1, 0.0]
    DPM(spy, sde, x_T, steps=6, coefficients=[(1.0, 1.0, s) for s in shifts])
    nominal = [(float(t), None) for t in levels(sde, 6, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0).t[:6]]
    for (t_seen, x_seen), (t_nom, _), s in zip(seen, nominal, shifts):
        sig = float(sde.sigma(torch.tensor(t_nom, dtype=F64))) * math.exp(s)
        assert float(sde.sigma(torch.tensor(t_seen, dtype=F64))) == pytest.approx(sig, rel=1e-9)
    # the network sees the same y = x / alpha at the shifted level: x scaled by alpha(t') / alpha(t)
    first = seen[0][1] / float(sde.alpha(torch.tensor(seen[0][0], dtype=F64)))
    torch.testing.assert_close(first, x_T / float(sde.alpha(torch.tensor(nominal[0][0], dtype=F64))))


def test_coefficients_validation():
    sde, model, x_T = _ring_problem(2)
    f = DPM
    with pytest.raises(ValueError, match="steps = 4"):
        f(model, sde, x_T, steps=4, coefficients=[(1.0, 1.0, 0.0)] * 3)
    with pytest.raises(ValueError, match="finite"):
        f(model, sde, x_T, steps=2, coefficients=[(1.0, float("nan"), 0.0), (1.0, 1.0, 0.0)])
    with pytest.raises(ValueError, match="triples"):
        f(model, sde, x_T, steps=2, coefficients=[1.0, 2.0])
    with pytest.raises(ValueError, match="coefficients must be None, True or False"):  # it fits them itself
        calibrate_grid(model, sde, (2,), steps=4, coefficients=[(1.0, 1.0, 0.0)] * 4)


def test_coefficients_fit_is_validated_and_optional():
    """Off: the grid alone. On: the coefficients are kept only if they do no worse on the validation
    half than the grid alone, and the solver then reads them from the grid object."""
    sde, model, x_T = _ring_problem(200, seed=1)
    kw = dict(steps=6, pilot_samples=2000, typical_samples=100, pilot_steps=80, max_sweeps=4, dtype=F64)
    off = calibrate_grid(model, sde, (2,), coefficients=False, **kw)
    on = calibrate_grid(model, sde, (2,), **kw)
    assert off.coefficients is None and off.coefficients_tried == 0 and off.validation_rms == off.validation_grid_rms
    assert on.t == off.t and on.validation_grid_rms == off.validation_grid_rms
    assert on.coefficients_tried > 0 and on.validation_rms <= on.validation_grid_rms
    assert on.coefficients is not None  # on this ring they help: validation RMS 0.125 (grid alone) -> 0.115
    f = DPM
    torch.testing.assert_close(f(model, sde, x_T, steps=6, t_grid=on),
                               f(model, sde, x_T, steps=6, t_grid=list(on.t), coefficients=on.coefficients), rtol=0, atol=0)


def test_version_1_grid_files_still_load(calibrated, tmp_path):
    import json

    sde, model, grid = calibrated
    path = tmp_path / "old.json"
    grid.save(path)
    data = json.loads(path.read_text())
    for k in ("coefficients", "validation_grid_rms", "coefficients_tried"):
        data.pop(k)
    data["format"] = "scoresde.CalibratedGrid/1"
    path.write_text(json.dumps(data))
    old = CalibratedGrid.load(path)
    assert old.coefficients is None and old.t == grid.t and old.validation_grid_rms == old.validation_rms


# ---------------------------------------------------------------------------------------------
# The pieces of calibrate_grid, each alone (fast: no full calibration)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(steps=1), "steps must be an int >= 2"),
    (dict(steps=4.0), "steps must be an int >= 2"),
    (dict(steps=4, pilot_samples=3), "pilot_samples must be an int >= 4"),
    (dict(steps=4, pilot_steps=3), "pilot_steps must be an int >= 4"),
    (dict(steps=4, knots=1), "knots must be an int >= 2"),
    (dict(steps=4, max_sweeps=0), "max_sweeps must be an int >= 1"),
    (dict(steps=4, typical_samples=True), "typical_samples must be an int >= 1"),
    (dict(steps=4, at_risk=1.0), r"at_risk must be a fraction in \[0, 1\)"),
    (dict(steps=4, at_risk=-0.1), r"at_risk must be a fraction in \[0, 1\)"),
    (dict(steps=4, at_risk="0.1"), r"at_risk must be a fraction in \[0, 1\)"),
    (dict(steps=4, coefficients="yes"), "coefficients must be None, True or False"),
    (dict(steps=4, pilot_seed=1.5), "pilot_seed must be an int"),
])
def test_settings_reject_bad_values_with_one_clear_line(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        CalibrationSettings(**kw)
    assert "\n" not in str(err.value)


def test_settings_defaults_and_derived_values():
    s = CalibrationSettings(steps=10)
    assert (s.pilot_samples, s.at_risk, s.typical_samples, s.pilot_steps, s.knots, s.max_sweeps) == (64000, 0.05, 2000, 200, 10, 40)
    assert s.fits_coefficients and not CalibrationSettings(steps=16).fits_coefficients
    assert CalibrationSettings(steps=16, coefficients=True).fits_coefficients
    assert not CalibrationSettings(steps=4, coefficients=False).fits_coefficients
    fit, val = CalibrationSettings(steps=4, pilot_samples=9).halves
    assert fit.tolist() == [0, 1, 2, 3] and val.tolist() == [4, 5, 6, 7, 8]
    s = CalibrationSettings(steps=4, at_risk=0.1, typical_samples=5)
    assert s.selected(100) == 10 + 5 and s.selected(8) == 0 + 5 and s.selected(3) == 0 + 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5


def test_selection_keeps_the_riskiest_whole_and_weights_sum_to_the_half():
    """Ids 10..29 (a half of 20) with risk = id mod 7: at_risk 0.25 keeps the 5 riskiest whole (the
    6s and 5s: 13, 20, 27, 12, 19), and 4 evenly spaced ones of the other 15 stand for them."""
    risk = (torch.arange(40) % 7).to(F64)
    ids = torch.arange(10, 30)
    sel = select(risk, ids, 0.25, 4)
    assert sel.size == 20 and len(sel.ids) == len(sel.weights) == 5 + 4
    assert sorted(sel.ids[:5].tolist()) == [12, 13, 19, 20, 27]
    assert risk[sel.ids[:5]].tolist() == sorted(risk[sel.ids[:5]].tolist(), reverse=True)
    rest = sorted(set(ids.tolist()) - set(sel.ids[:5].tolist()))
    assert sel.ids[5:].tolist() == [rest[0], rest[5], rest[9], rest[14]]  # round(linspace(0, 14, 4))
    assert sel.weights[:5].tolist() == [1.0] * 5 and sel.weights[5:].tolist() == [15 / 4] * 4
    assert float(sel.weights.sum()) == 20.0
    # the estimate is exact for anything constant on the rest: sum_i w_i e_i = sum over the half
    e = torch.full((40,), 0.3, dtype=F64)
    e[sel.ids[:5]] = torch.tensor([5.0, 1.0, 2.0, 7.0, 3.0], dtype=F64)
    assert float((sel.weights * e[sel.ids]).sum()) == pytest.approx(float(e[ids].sum()), rel=1e-15)


def test_selection_without_an_at_risk_stratum_is_the_whole_half():
    sel = select(torch.rand(16, dtype=F64), torch.arange(8, 16), 0.0, 100)
    assert sel.ids.tolist() == list(range(8, 16)) and sel.weights.tolist() == [1.0] * 8


def test_pilot_stratifies_each_half_on_its_own():
    settings = CalibrationSettings(steps=4, pilot_samples=200, at_risk=0.1, typical_samples=30)
    risk = torch.zeros(200, dtype=F64)
    risk[[3, 50, 150, 199]] = 1.0  # two risky starts in each half
    pilot = Pilot.from_risk(risk, settings)
    assert set(pilot.fit.ids.tolist()) <= set(range(100)) and set(pilot.validation.ids.tolist()) <= set(range(100, 200))
    assert {3, 50} <= set(pilot.fit.ids[:10].tolist()) and {150, 199} <= set(pilot.validation.ids[:10].tolist())
    for sel in (pilot.fit, pilot.validation):
        assert len(sel.ids) == settings.selected(100) == 40 and float(sel.weights.sum()) == 100.0


def test_screen_narrows_the_window_only_when_it_is_wide_enough():
    assert screen_knobs((0.5, 10.0)) == [{}, {"schedule": "uniform"}, {"window": (1.0, 5.0)}]
    assert screen_knobs((1.0, 4.0)) == [{}, {"schedule": "uniform"}]


def _gaussian_stratum(sde, n=12):
    x = fresh_noise(sde, n, seed=2)
    ref = gaussian_endpoint(sde, x)  # the exact endpoint stands for the accurate solve here
    w = torch.linspace(0.5, 2.0, n, dtype=F64)
    return Stratum(x, ref, w / (w.sum() * 3))


def test_objective_is_the_weighted_mse_of_the_solve_and_counts_its_cost():
    sde = VPSDE()
    model = GaussianMixture.gaussian(MU, S).eps_model(sde)
    solver = PilotSolver(model, sde, COARSE, batch_size=5)
    stratum = _gaussian_stratum(sde)
    family = WarpFamily.around_default(sde, 6, DPM_RECORD.options(COARSE))
    t = family.times([0.0, 1.0, -0.5])
    v = Objective(solver, stratum, 6)(t)
    out = DPM(model, sde, stratum.x, steps=6, t_grid=t, **COARSE)
    direct = sum(float(stratum.weights[i]) * float((out[i] - stratum.ref[i]).pow(2).sum()) for i in range(12))
    assert v == pytest.approx(direct, rel=1e-12)
    assert solver.cost == 12 * 6 and solver.network_calls == 3 * 6  # chunks of 5, 5, 2
    seen = []
    Objective(solver, stratum, 6, on_value=seen.append)(t, [(1.0, 1.0, 0.0)] * 6)
    assert len(seen) == 1 and solver.cost == 2 * 12 * 6


def test_coefficient_objective_equals_full_solves_and_pays_only_the_rerun_steps():
    """Resumed from the current point's states, each value is exactly (==) the full solve's, and
    a set first differing at step k costs (steps - k) x starts; the current point moves iff a value
    is lower than its own."""
    sde, model, _ = _ring_problem()
    solver = PilotSolver(model, sde, {}, batch_size=7)
    x = fresh_noise(sde, 16)[:, :2]
    stratum = Stratum(x, 3.0 * torch.tanh(x), torch.full((16,), 1 / 32, dtype=F64))  # any endpoints will do here
    t = levels(sde, 8, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0).t
    full = Objective(PilotSolver(model, sde, {}), stratum, 8)
    start_value = full(t, [(1.0, 1.0, 0.0)] * 8)
    obj = CoefficientObjective(solver, stratum, 8, t, start_value)
    assert solver.cost == 16 * 8 and obj.value == start_value
    moves = []
    for k, triple in ((3, (1.25, 1.0, 0.0)), (0, (1.0, 0.75, 0.0)), (6, (1.0, 1.0, 0.2)), (5, (0.5, 1.0, 0.0))):
        flat = list(obj.flat)
        flat[3 * k : 3 * k + 3] = triple
        before, current, current_value = solver.cost, list(obj.flat), obj.value
        v = obj(flat)
        assert v == full(t, as_triples(flat, 8))
        assert solver.cost - before == 16 * (8 - k)
        assert obj.flat == (flat if v < current_value else current)
        moves.append(v < current_value)
    assert any(moves) and not all(moves)  # both branches seen


def test_validation_picks_the_lowest_and_the_first_listed_on_a_tie():
    calls = []

    def val(c):
        calls.append(("val", c))
        return {"half": 2.0, "fitted": 1.0}[c]

    def fit(c):
        calls.append(("fit", c))
        return 9.0

    choice = validate(("none", "half", "fitted"), val, fit, known_validation={0: 1.0}, known_fit={0: 5.0, 2: 4.0})
    assert (choice.index, choice.validation, choice.fit, choice.computed_fit) == (0, 1.0, 5.0, 0)  # tie: the default
    assert calls == [("val", "half"), ("val", "fitted")]  # the known one is not recomputed
    choice = validate(("none", "half", "fitted"), lambda c: {"none": 3.0, "half": 1.0, "fitted": 1.0}[c], fit)
    assert (choice.index, choice.fit, choice.computed_fit) == (1, 9.0, 1) and calls[-1] == ("fit", "half")


def test_coordinate_descent_finds_the_minimum_and_drops_coordinates_that_cannot_act():
    moved = []

    def f(x):
        moved.append(x)
        return (x[0] - 1.0) ** 2 + (x[2] + 0.25) ** 2  # x[1] does not act

    x, v, tried = coordinate_descent(f, [0.0, 0.0, 0.0], f([0.0, 0.0, 0.0]), [0.5, 0.5, 0.5], max_sweeps=20)
    assert x == [1.0, 0.0, -0.25] and v == 0.0 and tried == len(moved) - 1
    assert sum(1 for m in moved if m[1] != 0.0) == 2  # x[1] tried once each way, then never again
    # a sweep bound stops it early
    assert coordinate_descent(f, [0.0] * 3, f([0.0] * 3), [0.5] * 3, max_sweeps=1)[0] == [0.5, 0.0, 0.0]


def test_warp_family_times():
    """Zero knots give the default window grid; any knots keep its ends exactly and the times
    decreasing; the times are t_from_sigma(exp(-warp_grid(...)))."""
    sde = VPSDE()
    family = WarpFamily.around_default(sde, 8, DPM_RECORD.options({}))
    default = levels(sde, 8, "window", None, "t", sigma_lo=0.5, sigma_hi=10.0).t
    assert family.times([0.0] * 5) == pytest.approx(default, abs=2e-3)
    t = family.times([0.0, 1.5, -1.0, 0.5])
    assert t[0] == default[0] and t[-1] == default[-1] and all(b < a for a, b in zip(t, t[1:]))
    lam = torch.tensor(warp_grid(family.base_lam, [0.0, 1.5, -1.0, 0.5], 8), dtype=F64)
    assert t[1:-1] == sde.t_from_sigma(torch.exp(-lam)).tolist()[1:-1]
    narrow = WarpFamily.around_default(sde, 8, DPM_RECORD.options({"window": (1.0, 5.0)}))
    assert narrow.times([0.0] * 5) == pytest.approx(levels(sde, 8, "window", None, "t", sigma_lo=1.0, sigma_hi=5.0).t, abs=2e-3)
